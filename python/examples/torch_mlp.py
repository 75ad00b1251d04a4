"""A PyTorch MLP for Cohort's ``training.runtime: command`` (needs ``torch`` installed on
the party; Cohort's tests run it only where ``import torch`` works).

The job's model is ``model.arch: mlp``: layers ``fc{i}.weight`` [out, in] and ``fc{i}.bias``
[out], ReLU between them, as Cohort's own trainer has them. A training task runs ``epochs``
of the job's optimizer (sgd or adam) on the party's training split; an evaluation reports
loss and accuracy on the held-out split. It trains on a GPU when ``training.device`` is
``cuda`` (or ``auto`` and torch sees one). Job spec:

    model: {arch: mlp, hidden: [32]}
    training:
      runtime: command
      command: [python3, /path/to/torch_mlp.py]
      epochs: 2
      batch_size: 32
      optimizer: {name: adam, lr: 0.01}
"""

import numpy as np
import torch
import torch.nn.functional as F

from cohort_client import Task


def device_of(task):
    """training.device: cuda needs a GPU; auto takes one when there is one."""
    wanted = task.hyperparameters.get("device", "auto")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise SystemExit("training.device is cuda, but torch sees no GPU here")
    return torch.device("cuda" if wanted != "cpu" and torch.cuda.is_available() else "cpu")


def layers_of(model, device):
    count = len(model) // 2
    names = [(f"fc{i}.weight", f"fc{i}.bias") for i in range(count)]
    missing = [n for pair in names for n in pair if n not in model]
    if missing:
        raise SystemExit(f"expected an mlp model (fc0..fc{count - 1}), missing {missing}")
    return [(torch.tensor(model[w], device=device).requires_grad_(),
             torch.tensor(model[b], device=device).requires_grad_())
            for w, b in names]


def forward(layers, x):
    for i, (w, b) in enumerate(layers):
        x = F.linear(x, w, b)
        if i + 1 < len(layers):
            x = F.relu(x)
    return x


def main():
    task = Task.from_env()
    torch.manual_seed(task.seed)
    device = device_of(task)
    layers = layers_of(task.load_model(), device)
    params = [p for pair in layers for p in pair]
    x_np, y_np = task.load_data()
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
    if task.kind == "train":
        opt = task.hyperparameters.get("optimizer", {})
        if opt.get("name") == "adam":
            optimizer = torch.optim.AdamW(params, lr=task.lr,
                                          betas=(opt.get("beta1", 0.9), opt.get("beta2", 0.999)),
                                          weight_decay=opt.get("weight_decay", 0.0))
        else:
            optimizer = torch.optim.SGD(params, lr=task.lr)
        generator = torch.Generator().manual_seed(task.seed)
        for _ in range(task.epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), task.batch_size):
                batch = order[start:start + task.batch_size]
                optimizer.zero_grad()
                F.cross_entropy(forward(layers, x[batch]), y[batch]).backward()
                optimizer.step()
        task.save_model({name: p.detach().cpu().numpy().astype(np.float32)
                         for i, (w, b) in enumerate(layers)
                         for name, p in ((f"fc{i}.weight", w), (f"fc{i}.bias", b))})
    with torch.no_grad():
        logits = forward(layers, x)
        loss = float(F.cross_entropy(logits, y))
        accuracy = float((logits.argmax(dim=1) == y).float().mean())
    print(f"{task.kind}: {len(y)} samples, loss {loss:.4f}, accuracy {accuracy:.4f}")
    task.write_metrics(samples=len(y), loss=loss, accuracy=accuracy)


if __name__ == "__main__":
    main()
