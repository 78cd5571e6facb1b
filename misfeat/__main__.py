"""``python -m misfeat``: the CLI (also the entry point under ``torchrun -m misfeat``)."""

from misfeat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
