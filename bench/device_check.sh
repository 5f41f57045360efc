#!/usr/bin/env bash
# The GPU check: bnlab's layer tests and BN benchmark on a CUDA device, through the backend
# registry (torch's kernels on the GPU until a GPU backend is registered; see README,
# "Backends"). On a machine without CUDA it says so and exits 0.
#   bash bench/device_check.sh            (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "device_check: no CUDA device here; nothing to check"
  exit 0
fi
"$PY" - <<'PYEOF'
import time, torch, bnlab
dev = "cuda"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
torch.manual_seed(0)
for name, make in [("BatchNorm2d", lambda: bnlab.BatchNorm2d(64)),
                   ("BatchNorm2d(window)", lambda: bnlab.BatchNorm2d(64, running="window", window_size=4)),
                   ("BatchNormAct2d", lambda: bnlab.BatchNormAct2d(64, act="leaky_relu")),
                   ("BatchRenorm2d", lambda: bnlab.BatchRenorm2d(64, warmup_steps=0)),
                   ("GhostBatchNorm2d", lambda: bnlab.GhostBatchNorm2d(64, virtual_batch_size=8))]:
    ours = make().to(dev)
    ref = torch.nn.BatchNorm2d(64).to(dev)
    x = torch.randn(32, 64, 28, 28, device=dev, requires_grad=True)
    y = ours(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), name
    if name == "BatchNorm2d":
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ours(x.detach()).dtype == torch.float32  # conv-free: autocast leaves BN in fp32
    print(f"{name:20s} ok")
for layer in (bnlab.BatchNorm2d(256).to(dev), torch.nn.BatchNorm2d(256).to(dev)):
    x = torch.randn(64, 256, 28, 28, device=dev, requires_grad=True)
    g = torch.randn_like(x)
    for _ in range(10):
        layer(x).backward(g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        layer(x).backward(g)
    torch.cuda.synchronize()
    print(f"{type(layer).__module__.split('.')[0]:6s} fwd+bwd (64,256,28,28): "
          f"{(time.perf_counter() - t0) * 10:.3f} ms")
PYEOF
echo "device_check: layer tests on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
# the CPU reference suites on the same machine (torch kernels: the GPU path on CPU)
BNLAB_KERNELS=torch "$PY" -m pytest -q -x tests/test_battery.py tests/test_stack.py -p no:cacheprovider
