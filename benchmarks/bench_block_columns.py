"""10-column cached Hessian block: ours vs plain torch (one graph + 10 second backwards), contiguous and strided inputs.

Run: python benchmarks/bench_block_columns.py (one thread, medians of 7 interleaved repeats)
"""
import torch, time, statistics
from torch import nn
import curvature
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
g = torch.Generator().manual_seed(1)
X, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
k = 10
V = torch.randn(H.shape[0], k, generator=g)
H @ V
params = [p for p in model.parameters()]
loss = nn.CrossEntropyLoss()(model(X), y)
grads = torch.autograd.grad(loss, params, create_graph=True)
Vt = V.T.contiguous()
def plain():
    outs = []
    for c in range(k):
        col = torch.split(Vt[c], [p.numel() for p in params])
        r = torch.autograd.grad(grads, params, grad_outputs=[t.view(p.shape) for t, p in zip(col, params)], retain_graph=True)
        outs.append(torch.cat([x.reshape(-1) for x in r]))
    return torch.stack(outs, 1)
def plain_strided():
    outs = []
    pieces = torch.split(V, [p.numel() for p in params])
    for c in range(k):
        r = torch.autograd.grad(grads, params, grad_outputs=[t[:, c].view(p.shape) if False else t[:, c].reshape(p.shape) for t, p in zip(pieces, params)], retain_graph=True)
        outs.append(torch.cat([x.reshape(-1) for x in r]))
    return torch.stack(outs, 1)
def ours():
    return H @ V
assert torch.allclose(plain(), ours(), rtol=1e-4, atol=1e-6)
ta, tb, tc = [], [], []
for _ in range(7):
    t = time.perf_counter(); ours(); ta.append(time.perf_counter() - t)
    t = time.perf_counter(); plain(); tb.append(time.perf_counter() - t)
    t = time.perf_counter(); plain_strided(); tc.append(time.perf_counter() - t)
a, b, c = statistics.median(ta), statistics.median(tb), statistics.median(tc)
print(f"10-column cached block: ours {a*1e3:.0f} ms, plain torch contiguous {b*1e3:.0f} ms, plain strided {c*1e3:.0f} ms; ours/contiguous {a/b:.3f}, strided/contiguous {c/b:.3f}")
