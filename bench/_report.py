"""The one JSON line every benchmark ends with: {"bench", "unit", "lm", "peer", "peer_name", "speedup"}."""

import json


def report(bench: str, unit: str, ours: float, peer: float, peer_name: str, higher_is_better: bool) -> None:
    """Print the closing JSON line; `speedup` > 1 means lm is better, whichever way the unit points."""
    speedup = ours / peer if higher_is_better else peer / ours
    print(json.dumps({"bench": bench, "unit": unit, "lm": round(ours, 3), "peer": round(peer, 3),
                      "peer_name": peer_name, "speedup": round(speedup, 3)}))
