"""``python -m training ...`` = ``flywheel train ...``; for ``torchrun --nproc-per-node N -m training ...``."""

from training.cli import train_app

if __name__ == "__main__":
    train_app(prog_name="python -m training")
