"""Plumbing every training recipe shares: the one training loop (``loop``: optimiser, accelerate,
checkpoints, early stopping), the generator's own samples and right padding (``samples``), and
LoRA helpers (``adapters``: add a LoRA, save a PEFT folder naming the real base). The recipes
themselves live with their methods (steering, conditioning, adapters)."""
