"""Re-run the GNS notebook's cells with the authors' own code, for the one-to-one counts in REPRODUCTIONS.md.

    git clone https://github.com/epfml/grad-norm-smooth
    OMP_NUM_THREADS=1 python examples/gns_authors_rerun.py grad-norm-smooth/src

Prints, per cell, the first iteration with f - f* < 1e-8 (``None``: not reached in the
notebook's budget); ``examples/reproductions.py`` quotes these numbers next to ours
(``AUTHORS_GNS_COUNTS``).  Needs numpy and scipy; not part of the test suite.
"""
import sys

import numpy as np

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "src")
from methods import gradient_method, grad_norm_smooth  # noqa: E402
from oracles import NonlinearEquationsRosenbrockOracle, RosenbrockOracle, create_log_sum_exp_zero_oracle  # noqa: E402

def first_below(h, fs, eps=1e-8):
    for k, f in enumerate(h['func']):
        if f - fs < eps: return k
    return None
approx_hess_fn_logsumexp = lambda o, x: (o._update_a_and_pi(x), o.matmat_ATsA(o.pi) / o.mu)[1]
n = m = 1000; mu = 1.0
np.random.seed(3124)
A = np.random.rand(n, m) * 2 - 1
b = np.random.rand(m) * 2 - 1
oracle = create_log_sum_exp_zero_oracle(A.T, b, mu)
f_star = oracle.func(np.zeros(n)); x_0 = np.ones(n); B = A.dot(A.T); Binv = np.linalg.inv(B)
for approx in (False, True):
    _, msg, h = grad_norm_smooth(oracle, x_0, n_iters=1000, gamma_0=1.0, adaptive_search=True, is_approx=approx,
                                 approx_oracle=oracle, approx_hess_fn=approx_hess_fn_logsumexp, B=B, Binv=Binv,
                                 f_star=f_star, eps=1e-8)
    print('logsumexp GNS', 'weighted GN' if approx else 'exact', first_below(h, f_star), msg, flush=True)
for BB in (B, None):
    _, msg, h = gradient_method(oracle, x_0, max_iter=1000, L_0=1.0, B=BB, Binv=Binv if BB is not None else None, line_search=True)
    print('logsumexp GM', 'metric' if BB is not None else 'euclid', first_below(h, f_star), flush=True)
oracle = RosenbrockOracle(a=1.0, b=100.0)
_, msg, h = grad_norm_smooth(oracle, np.array([-2.0, 2.0]), n_iters=60, gamma_0=1.0, adaptive_search=True, is_approx=False,
                             approx_oracle=oracle, approx_hess_fn=None, B=None, Binv=None, eps=1e-8)
print('rosenbrock GNS exact', first_below(h, 0.0), flush=True)
_, msg, h = gradient_method(oracle, np.array([-2.0, 2.0]), max_iter=5000, L_0=1.0, B=None, Binv=None, line_search=True)
print('rosenbrock GM', first_below(h, 0.0), flush=True)
p = 5
oracle = NonlinearEquationsRosenbrockOracle(p=p, a=1.0, b=100.0)
_, msg, h = grad_norm_smooth(oracle, np.array([-2.0, 2.0]), n_iters=100, gamma_0=1.0, adaptive_search=True, is_approx=False,
                             approx_oracle=oracle, approx_hess_fn=None, B=None, Binv=None, eps=1e-8)
print('rosenbrock p=5 GNS exact', first_below(h, 0.0), flush=True)
_, msg, h = gradient_method(oracle, np.array([-2.0, 2.0]), max_iter=10000, L_0=1.0, B=None, Binv=None, line_search=True)
print('rosenbrock p=5 GM', first_below(h, 0.0), flush=True)
