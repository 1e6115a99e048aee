"""A training step compiled with torch.compile(fullgraph=True): no graph break, no host sync.

    python examples/compile_step.py
"""
import torch

import mitkernels

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
criterion = mitkernels.MiTLoss(5)
optimizer = torch.optim.SGD([*model.parameters(), *criterion.parameters()], lr=0.1)


@torch.compile(fullgraph=True)
def forward(x, y):
    loss, stats = criterion(model(x), y)
    return loss, stats


for step in range(5):
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    optimizer.zero_grad()
    loss, stats = forward(x, y)
    loss.backward()
    optimizer.step()
print(f"loss={float(loss.detach()):.4f} T={float(stats['T']):.4f} lambda={float(stats['lambda']):.4f} "
      f"steps={int(criterion.dual_updates)}")
