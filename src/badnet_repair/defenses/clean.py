"""What every defense receives: the defender's clean validation data, split for
learning and for choosing, and the memo that runs over one BadNet share."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from badnet_repair.data import Dataset


@dataclass
class CleanData:
    """The defender's clean validation images: whole, and split into `train` (to learn
    from) and `holdout` (to choose with: how much, how strong, when to stop)."""

    validation: Dataset
    train: Dataset
    holdout: Dataset


class Memo(dict):
    """What every run over one BadNet and its data shares in this process (a sweep's
    points): each value computed once, by whichever run needs it first."""

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once; `key` names everything else it depends on."""
        if key not in self:
            self[key] = compute()
        return self[key]
