"""Write calibration/heldout sample files (one sentence per line) for the CLI examples:

    python calibration/make_samples.py            # -> calibration/sentences.txt, calibration/heldout.txt
"""

from pathlib import Path

from ortq.data import real_text

HERE = Path(__file__).parent

if __name__ == "__main__":
    (HERE / "sentences.txt").write_text("\n".join(real_text("calibration", 256)) + "\n", encoding="utf-8")
    (HERE / "heldout.txt").write_text("\n".join(real_text("heldout", 128)) + "\n", encoding="utf-8")
