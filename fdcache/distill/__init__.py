"""Distillation: teachers, students, the shared pixel path, extraction and the FD training task."""
