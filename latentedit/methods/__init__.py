"""The papers' math as small functions and modules, shared by the trainer and the editor."""
