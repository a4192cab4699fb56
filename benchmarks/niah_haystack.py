"""Write the synthetic haystack of the README's needle-in-a-haystack grid: 400 plain sentences drawn (seed 3) from
eight, about 6,000 SmolLM2 tokens (the suite repeats a haystack shorter than its longest length).

    python benchmarks/niah_haystack.py hay.txt
    attnscope suite niah --haystack hay.txt --out runs/niah      # lengths 1024..8192, depths 0..1
"""

from __future__ import annotations

import random
import sys

SENTENCES = (
    "The old city library kept maps of rivers that no longer flow",
    "Farmers in the valley traded wool for salt each spring",
    "A quiet harbour town grew around the lighthouse",
    "Students argued about the meaning of time late into the night",
    "The baker rose before dawn to light the ovens",
    "Winter storms closed the mountain pass for weeks",
    "Merchants wrote letters about prices, weather and debts",
    "Children learned to swim in the cold lake behind the mill",
)


def haystack(n: int = 400, seed: int = 3) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(SENTENCES) + "." for _ in range(n))


if __name__ == "__main__":
    text = haystack()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
