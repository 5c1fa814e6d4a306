#!/usr/bin/env python3
"""Reference numbers for tests/optim_test.cpp, computed with PyTorch (torch.optim.AdamW,
torch.optim.SGD, torch.nn.utils.clip_grad_norm_) in float64.

Run: /usr/bin/python3 tests/python/optim_golden.py
The printed C++ arrays are pasted into optim_test.cpp ("golden" test cases).

Scenario (mirrored in the C++ test):
  a: [2, 2] = [0.5, -1.0, 1.5, 2.0]   (group 0)
  b: [3]    = [0.1, -0.2, 0.3]        (group 1)
  gradient at step k (1-based), flat element i: a: sin(k + i), b: 0.5 * cos(2k + i)
"""
import math

import torch

torch.set_default_dtype(torch.float64)


def params():
    a = torch.tensor([[0.5, -1.0], [1.5, 2.0]], requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    return a, b


def set_grads(a, b, k):
    a.grad = torch.tensor([math.sin(k + i) for i in range(4)]).reshape(2, 2)
    b.grad = torch.tensor([0.5 * math.cos(2 * k + i) for i in range(3)])


def show(name, t):
    vals = ", ".join(f"{v:.17g}" for v in t.detach().flatten().tolist())
    print(f"  {name} = {{{vals}}};")


def adamw():
    # 4 steps; before step 3 group 0 gets lr 2e-2, wd 0.2 and group 1 gets lr 0.
    a, b = params()
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-2, "weight_decay": 0.1},
                             {"params": [b], "lr": 5e-3, "weight_decay": 0.0}])
    for k in range(1, 5):
        if k == 3:
            opt.param_groups[0]["lr"] = 2e-2
            opt.param_groups[0]["weight_decay"] = 0.2
            opt.param_groups[1]["lr"] = 0.0
        set_grads(a, b, k)
        opt.step()
    print("AdamW after 4 steps:")
    show("a", a)
    show("b", b)
    show("m_a", opt.state[a]["exp_avg"])
    show("v_a", opt.state[a]["exp_avg_sq"])
    show("m_b", opt.state[b]["exp_avg"])
    show("v_b", opt.state[b]["exp_avg_sq"])


def sgd(momentum, dampening, nesterov):
    a, b = params()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1, "weight_decay": 0.01},
                           {"params": [b], "lr": 0.05, "weight_decay": 0.0}],
                          lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov)
    for k in range(1, 4):
        set_grads(a, b, k)
        opt.step()
    print(f"SGD momentum {momentum} dampening {dampening} nesterov {nesterov}, 3 steps:")
    show("a", a)
    show("b", b)
    show("buf_a", opt.state[a]["momentum_buffer"])
    show("buf_b", opt.state[b]["momentum_buffer"])


def clip():
    a, b = params()
    set_grads(a, b, 1)
    norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=0.5)
    print("clip_grad_norm_(max_norm=0.5) on the step-1 gradients:")
    print(f"  norm = {norm.item():.17g};")
    show("g_a", a.grad)
    show("g_b", b.grad)


if __name__ == "__main__":
    print(f"# torch {torch.__version__}")
    adamw()
    sgd(0.9, 0.1, False)
    sgd(0.9, 0.0, True)
    clip()
