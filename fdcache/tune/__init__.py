"""Fine-tuning and evaluation: image folders, classifiers, the fine-tuning/FLYP task, top-1 evaluation, WiSE-FT."""
