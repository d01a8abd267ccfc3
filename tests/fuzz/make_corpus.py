"""Writes the seed corpus of the C API fuzzer: tests/fuzz/corpus/<scenario>-<n>.

The harness reads its input with libFuzzer's FuzzedDataProvider, which takes
integers from the end: the last byte picks the scenario (modulo 7), the 8 bytes
before it seed the harness' data generator, and the remaining bytes are the
decisions (dtype, shape, strides, axes, mask, configuration, a broken argument).
Run from the repository root: python3 tests/fuzz/make_corpus.py [directory]
(default: tests/fuzz/corpus).
"""

import pathlib
import random
import sys

SCENARIOS = [
    "moments",
    "normalize",
    "train_forward",
    "backward",
    "moments_partial",
    "backward_sums",
    "config",
]
FILES_PER_SCENARIO = 4


def main(argv: list[str]) -> None:
    default = pathlib.Path(__file__).resolve().parent / "corpus"
    corpus = pathlib.Path(argv[1]) if len(argv) > 1 else default
    corpus.mkdir(exist_ok=True)
    rng = random.Random(28)
    for index, name in enumerate(SCENARIOS):
        for n in range(FILES_PER_SCENARIO):
            decisions = bytes(rng.randrange(256) for _ in range(rng.randrange(8, 96)))
            seed = bytes(rng.randrange(256) for _ in range(8))
            (corpus / f"{name}-{n}").write_bytes(decisions + seed + bytes([index]))


if __name__ == "__main__":
    main(sys.argv)
