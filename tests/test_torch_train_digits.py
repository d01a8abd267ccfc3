"""A small CNN trained on scikit-learn's digits reaches the same test accuracy with
cbn.torch modules (after convert) as with torch's own batch norm modules."""

import copy

import cbn.torch
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def digits():
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 64, bias=False), nn.BatchNorm1d(64),
        nn.ReLU(), nn.Linear(64, 10))


def train_and_test(model, x_train, y_train, x_test, y_test, epochs=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=order).split(64):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(x_train[idx].contiguous(memory_format=torch.channels_last)),
                y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def test_digits_cnn_reaches_torchs_accuracy():
    x_train, x_test, y_train, y_test = digits()
    torch.manual_seed(0)
    reference = cnn()
    converted = cbn.torch.convert(copy.deepcopy(reference))
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    accuracy_torch = train_and_test(reference, x_train, y_train, x_test, y_test)
    accuracy_cbn = train_and_test(converted, x_train, y_train, x_test, y_test)
    assert accuracy_torch >= 0.95
    assert abs(accuracy_cbn - accuracy_torch) <= 0.02, (accuracy_cbn, accuracy_torch)
