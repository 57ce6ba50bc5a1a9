"""What a training run shows while it trains, read from the device every --print-freq steps.

The loss and the positiveness statistics of each step stay on the device; every --print-freq
steps one collective sums them over ranks, which is also where the host waits for the device:
once per window, never per step (except with --amp fp16, whose GradScaler checks the
gradients for inf on the host every step: bf16, the default, needs no scaler). That read
updates the progress bar (on a terminal) or prints one plain line (SLURM, nohup: a bar's
carriage returns would fill the log) and stops the run on a non-finite loss.
"""
import math
import sys
import time

import torch
from tqdm import tqdm

from runtime import distributed
from runtime.signals import kept_checkpoint


def show_bars(main: bool) -> bool:
    """Progress bars on the main rank and on a terminal only: in a log file (SLURM, nohup) their
    carriage-return updates would fill it; plain lines and log.txt say the same there."""
    return main and sys.stderr.isatty()


class Progress:
    """The loop's statistics, kept on the device and read every --print-freq steps.

    Reading them is the loop's only host-device synchronisation and its only per-window
    collective on the training device: sums over ranks and a NaN check.
    """

    def __init__(self, args, env, epoch: int, start_it: int, steps: int):
        self.args, self.env, self.epoch, self.steps = args, env, epoch, steps
        self.window = torch.zeros(2, dtype=torch.float64, device=env.device)  # sums of loss and of w
        self.counts = [0, 0]                                                  # steps, w entries (host)
        self.totals = torch.zeros(4, dtype=torch.float64)                     # read so far this epoch
        self.w_max = torch.zeros((), device=env.device)
        self.first, self.wait_s, self.window_wait = start_it, 0.0, 0.0
        self.start = self.window_start = time.perf_counter()
        self.bar = tqdm(total=steps, initial=start_it, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                        disable=not show_bars(env.main))

    def add(self, loss, w, wait_s) -> None:
        self.window += torch.stack([loss.double(), w.double().sum()])
        self.counts = [self.counts[0] + 1, self.counts[1] + w.numel()]
        if w.numel():
            self.w_max = torch.maximum(self.w_max, w.max().float())
        self.wait_s += wait_s
        self.window_wait += wait_s
        self.bar.update()

    def read(self, it: int, lr: float) -> None:
        """Sum the window over ranks, show it; stop on a non-finite loss, saying what is kept."""
        sums = distributed.all_reduce_sum(self.window).cpu()  # the one sync per window
        # every rank ran the same steps with the same K: counts agree, sums average over ranks
        window = torch.cat([sums / self.env.world_size, torch.tensor(self.counts[::-1], dtype=torch.float64)])
        loss = window[0].item() / max(window[3].item(), 1)   # window: loss, w sums, w entries, steps
        if not math.isfinite(loss):
            step = self.epoch * self.steps
            raise FloatingPointError(f"loss is {loss} between step {step + self.first} and {step + it - 1} "
                                     f"(epoch {self.epoch + 1}, iterations {self.first}-{it - 1}); stopped, "
                                     f"{kept_checkpoint(self.args.output_dir)}")
        self.totals += window
        w = window[1].item() / max(window[2].item(), 1)
        now = time.perf_counter()
        images_s = (it - self.first) * self.args.batch_size / (now - self.window_start)
        wait = self.window_wait / (now - self.window_start)
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", w=f"{w:.3f}", img_s=f"{images_s:.0f}",
                                 wait=f"{wait:.0%}")
        elif self.env.main:
            print(f"epoch {self.epoch + 1}/{self.args.epochs} step {it}/{self.steps} loss {loss:.4f} lr {lr:.3g} "
                  f"w {w:.3f} images/s {images_s:.0f} data-wait {wait:.0%}", flush=True)
        self.first, self.window_start, self.window_wait = it, now, 0.0
        self.window.zero_()
        self.counts = [0, 0]

    def summary(self, done: int, lr: float, m: float) -> dict:
        """The epoch's log.txt entry (a collective: the largest w over ranks)."""
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        t = self.totals
        w_max = distributed.all_gather(self.w_max[None]).max().item()
        return {"epoch": self.epoch + 1, "loss": t[0].item() / max(t[3].item(), 1), "lr": lr, "momentum": m,
                "w_mean": t[1].item() / max(t[2].item(), 1), "w_max": w_max,
                "images_per_s": done * self.args.batch_size / elapsed, "epoch_s": elapsed,
                "data_wait_s": self.wait_s, "data_wait_share": self.wait_s / elapsed}
