"""GGN product per batch (state rebuilt every product: cache=False), new vs old (79e2a19) output Hessians.

Swaps curvature.ggn.output_hessian between the two implementations, interleaved repeats, medians.
"""
import importlib.util, statistics, sys, time
import torch
from torch import nn
torch.set_num_threads(1)
sys.path.insert(0, "/work/wt/losses")
import curvature, curvature.ggn as ggn
import subprocess, tempfile
OLD = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
OLD.write(subprocess.run(["git", "-C", "/work/wt/losses", "show", "79e2a19:curvature/losses.py"],
                         capture_output=True, text=True, check=True).stdout)
OLD.close()
spec = importlib.util.spec_from_file_location("old_losses", OLD.name)
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
new_fn = ggn.output_hessian
g = torch.Generator().manual_seed(0)
for B, T in [(256, None), (16, 32)]:
    torch.manual_seed(0)
    if T is None:
        model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10)); X = torch.randn(B, 20, generator=g)
        y = torch.randint(0, 10, (B,), generator=g)
    else:
        class M(nn.Module):
            def __init__(s):
                super().__init__(); s.f = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
            def forward(s, x): return s.f(x).transpose(1, 2)  # [B, C, T]
        model = M(); X = torch.randn(B, T, 20, generator=g); y = torch.randint(0, 10, (B, T), generator=g)
    op = curvature.GGNOperator(model, nn.CrossEntropyLoss(), (X, y), cache=False)
    v = torch.randn(op.shape[0], generator=g)
    times = {"new": [], "old": []}
    for rep in range(15):
        pairs = [("new", new_fn), ("old", old.output_hessian)]
        for name, f in (pairs if rep % 2 else pairs[::-1]):
            ggn.output_hessian = f
            t = time.perf_counter(); [op @ v for _ in range(3)]; times[name].append((time.perf_counter() - t) / 3)
    ggn.output_hessian = new_fn
    mn, mo = statistics.median(times["new"]), statistics.median(times["old"])
    print(f"B={B} T={T}: GGN product new/old = {mn / mo:.3f} (new {mn*1e3:.2f} ms, old {mo*1e3:.2f} ms)")
