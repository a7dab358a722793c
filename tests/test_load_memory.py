"""Loading SmolLM2 (parse + dequantize to float32) peaks at most 1.5x the float32 weights.
Measured in a fresh process: peak RSS (VmHWM) growth over the RSS after imports, which also
counts the file pages the memory map touched."""

import json
import subprocess
import sys

PROBE = """
import json
from mpinfer.model import Decoder
import mpinfer.gguf_file
base = int(open('/proc/self/statm').read().split()[1]) * 4096
model = Decoder.load(sys.argv[1])
c = model.config
attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
per_layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
weights = 4 * (c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size)  # float32, tied head
# VmHWM is this address space's peak; ru_maxrss would carry over the forking parent's
peak = 1024 * int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))
print(json.dumps({"weights": weights, "growth": peak - base}))
"""


def test_smollm2_load_peak_memory(smollm2):
    out = subprocess.run([sys.executable, "-c", "import sys\n" + PROBE, smollm2], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    print(f"weights {m['weights'] / 2**20:.0f} MiB, peak growth {m['growth'] / 2**20:.0f} MiB")
    assert 500 * 2**20 < m["weights"] < 530 * 2**20
    assert m["growth"] <= 1.5 * m["weights"]
