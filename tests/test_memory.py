"""Scoring memory is bounded by its budget, whatever the number of batches.

Each case runs in a fresh process and reports its peak resident set size (``ru_maxrss``): the
measure is memory, never time. Scoring 10 and 400 batches under the same ``memory_budget`` must
peak within 10% of each other; the same 400 batches with every row kept (``route="matfree"``)
must not (which shows the measurement sees the growth the budget prevents).
"""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import torch
import torch.nn.functional as F
import topoderiv as td
torch.manual_seed(0)
n_batches, route, budget = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
model = td.ResidualMLP(16, 64, 4, 4)
g = torch.Generator().manual_seed(0)

def batches():  # generated on the fly: the data itself is never resident
    for _ in range(n_batches):
        x = torch.randn(256, 16, generator=g)
        yield x, torch.sin(x[:, :4])

rep = td.score(model, batches(), F.mse_loss, route=route, memory_budget=budget)
assert rep.n_batches == n_batches
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak(n_batches: int, route: str, budget: float) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n_batches), route, str(budget)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"]


@pytest.mark.slow
def test_score_peak_memory_is_flat_in_the_number_of_batches():
    budget = 16 * 2**20
    few = _peak(10, "auto", budget)
    many = _peak(400, "auto", budget)
    kept = _peak(400, "matfree", budget)  # every row kept: about 5 points x 400 x 256 x 68 x 4 B = 140 MB
    assert many <= 1.10 * few, (few, many)
    assert kept > many + 100 * 1024, (many, kept)
