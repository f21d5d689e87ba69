"""Tools around the jobs: bench, diagnose, plots, quickstart, real trained weights."""
