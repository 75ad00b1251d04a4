"""Logistic regression in numpy for Cohort's ``training.runtime: command``.

The job's model is ``model.arch: logreg``: tensors ``fc0.weight`` [classes, features] and
``fc0.bias`` [classes]; logits = x @ weight.T + bias, as Cohort's own trainer has them, so
the coordinator's layout check passes and a model trained here evaluates anywhere.

A training task runs ``epochs`` of minibatch SGD (or Adam, as the job's optimizer says) on
the party's training split, with FedProx's proximal term when the job has one; an
evaluation reports loss and accuracy on the held-out split. Job spec:

    model: {arch: logreg}
    training:
      runtime: command
      command: [python3, /path/to/numpy_logreg.py]
      epochs: 5
      batch_size: 16
      optimizer: {name: sgd, lr: 0.5}
"""

import sys

import numpy as np

from cohort_client import Task


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_accuracy(w, b, x, y):
    p = softmax(x @ w.T + b)
    loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    accuracy = float((p.argmax(axis=1) == y).mean())
    return loss, accuracy


def train(task, w, b, x, y):
    hp = task.hyperparameters
    optimizer = hp.get("optimizer", {})
    name, lr = optimizer.get("name", "sgd"), task.lr
    mu = hp.get("proximal_mu") or 0.0
    w0, b0 = w.copy(), b.copy()
    rng = np.random.default_rng(task.seed)
    classes = w.shape[0]
    moments = [np.zeros_like(w), np.zeros_like(b), np.zeros_like(w), np.zeros_like(b)]
    beta1, beta2 = optimizer.get("beta1", 0.9), optimizer.get("beta2", 0.999)
    decay = optimizer.get("weight_decay", 0.0)
    step = 0
    for _ in range(task.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), task.batch_size):
            batch = order[start:start + task.batch_size]
            xb, yb = x[batch], y[batch]
            p = softmax(xb @ w.T + b)
            p[np.arange(len(yb)), yb] -= 1.0
            p /= len(yb)
            gw, gb = p.T @ xb + mu * (w - w0), p.sum(axis=0) + mu * (b - b0)
            if name == "adam":
                step += 1
                for i, g in enumerate((gw, gb)):
                    moments[i] = beta1 * moments[i] + (1 - beta1) * g
                    moments[i + 2] = beta2 * moments[i + 2] + (1 - beta2) * g * g
                m_hat = [moments[i] / (1 - beta1 ** step) for i in (0, 1)]
                v_hat = [moments[i + 2] / (1 - beta2 ** step) for i in (0, 1)]
                w -= lr * (m_hat[0] / (np.sqrt(v_hat[0]) + 1e-8) + decay * w)
                b -= lr * (m_hat[1] / (np.sqrt(v_hat[1]) + 1e-8) + decay * b)
            else:
                w -= lr * gw
                b -= lr * gb
    assert w.shape[0] == classes
    return w, b


def main():
    task = Task.from_env()
    model = task.load_model()
    if set(model) != {"fc0.weight", "fc0.bias"}:
        sys.exit(f"expected a logreg model (fc0.weight, fc0.bias), got {sorted(model)}")
    w, b = model["fc0.weight"], model["fc0.bias"]
    x, y = task.load_data()
    if x.shape[1] != w.shape[1]:
        sys.exit(f"the data has {x.shape[1]} features, the model {w.shape[1]}")
    if task.kind == "train":
        w, b = train(task, w, b, x, y)
        task.save_model({"fc0.weight": w, "fc0.bias": b})
    loss, accuracy = loss_and_accuracy(w, b, x, y)
    print(f"{task.kind}: {len(y)} samples, loss {loss:.4f}, accuracy {accuracy:.4f}")
    task.write_metrics(samples=len(y), loss=loss, accuracy=accuracy)


if __name__ == "__main__":
    main()
