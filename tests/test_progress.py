"""Progress bars in a log file or a pipe: one final line per bar, not one per refresh."""

from __future__ import annotations

import io

import torch

from yolo.engine.loop import Stepper, train_one_epoch
from yolo.utils.progress import FinalLineBar, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_bar_writes_one_final_line():
    out = io.StringIO()
    bar = progress(range(50), file=out, desc="epoch", mininterval=0)
    assert isinstance(bar, FinalLineBar)
    for i in bar:
        bar.set_description(f"epoch {i}")
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 1, repr(text)
    assert text.startswith("epoch 49: 100%") and "50/50" in text


def test_piped_bar_with_leave_false_writes_nothing():
    out = io.StringIO()
    for _ in progress(range(5), file=out, leave=False):
        pass
    assert out.getvalue() == ""


def test_terminal_bar_refreshes_as_tqdm():
    out = _Tty()
    for _ in progress(range(5), file=out, mininterval=0):
        pass
    assert not isinstance(progress([], file=out), FinalLineBar)
    assert out.getvalue().count("\r") > 2


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.mean() * self.w


def test_training_bar_in_a_log_is_one_line(capsys):
    """The training loop's bar, with stderr captured (not a TTY): one line for the epoch."""
    model = _TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(model, opt, torch.amp.GradScaler("cuda", enabled=False))
    loader = [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 6), ["a", "b"], None)] * 7

    def loss(pred, targets):
        return pred.sum(), torch.stack([pred.detach().sum()] * 3)

    train_one_epoch(model, loader, loss, stepper, torch.device("cpu"), 0, 1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and "7/7" in err, repr(err)
