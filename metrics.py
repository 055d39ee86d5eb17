"""The numbers that training, evaluation and the logs all compute from logits, in one place."""

import torch
import torch.nn.functional as F


def scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of logits against labels."""
    correct = (logits.argmax(dim=1) == labels).sum().item()
    return F.cross_entropy(logits, labels).item(), correct / len(labels)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """(10, 10) counts: row = true digit, column = predicted digit."""
    return torch.bincount(labels * 10 + predicted, minlength=100).view(10, 10)


def per_class(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall of each digit from the confusion matrix (0 where a digit was never predicted)."""
    hits = matrix.diag().double()
    return hits / matrix.sum(dim=0).clamp(min=1), hits / matrix.sum(dim=1).clamp(min=1)
