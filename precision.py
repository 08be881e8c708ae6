"""Training precision: the dtype weights train in, fp32 master weights for pure bf16, and the memory it all takes.

The rule: trainable weights are float32, or bfloat16 with float32 master copies (--bf16_weights). transformers 5
loads a checkpoint in the dtype it was saved in, and most hub models are saved in bf16: trained as loaded, with
plain AdamW at the paper's learning rates (1e-6 to 7e-6), most updates are smaller than half a bf16 step of the
weight and vanish, and `--fp16` on an fp16 checkpoint stops in the gradient scaler. So full fine-tuning loads
float32 weights and --bf16/--fp16 only turn on autocast; LoRA keeps the frozen base in the half precision asked
for (peft makes the adapters float32); DeepSpeed keeps fp32 master partitions of the bf16/fp16 weights itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw

import distributed

GIB = 2 ** 30


def autocast_precision(args) -> tuple[bool, bool]:
    """(bf16, fp16) autocast of the Trainer. fp16 needs a GPU; on CPU we say so and train in bf16 instead."""
    if args.fp16 and args.bf16:
        from common import UserError
        raise UserError("--fp16 and --bf16: choose one")
    if args.fp16 and not torch.cuda.is_available():
        if distributed.is_main():
            print("note: --fp16 needs a GPU; training in bf16 on this CPU")
        return True, False
    if args.bf16_weights:
        return False, False  # the weights themselves are bf16: no autocast over them
    return args.bf16, args.fp16


def load_dtype(args) -> torch.dtype:
    """The dtype `from_pretrained` loads the weights in (whatever the checkpoint was saved in)."""
    if args.bf16_weights:
        return torch.bfloat16
    if args.lora_r > 0 and not args.deepspeed and (args.bf16 or args.fp16):
        # the base is frozen: half precision loses nothing there, and halves the weights' memory
        return torch.bfloat16 if args.bf16 or not torch.cuda.is_available() else torch.float16
    return torch.float32


def ensure_fp32_trainable(model: torch.nn.Module, args) -> int:
    """Cast any trainable half-precision parameter to float32 (a model whose loading ignored `dtype`, or an
    adapter made in its base layer's dtype); returns how many were cast. Not for --bf16_weights, nor under
    DeepSpeed, whose engine owns the parameters' precision."""
    if args.bf16_weights or args.deepspeed:
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            cast += 1
    return cast


def checkpoint_dtype(config) -> str | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def describe(model: torch.nn.Module, args, saved_dtype: str | None, bf16: bool, fp16: bool,
             ds_config: dict | None) -> str:
    """One line: the dtype the trainable weights train in, the compute precision and where fp32 masters live."""
    trainable = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    dtypes = ", ".join(sorted(trainable)) or "none"
    saved = f" (the checkpoint holds {saved_dtype})" if saved_dtype else ""
    if ds_config is not None:
        ds_half = next((name for name in ("bf16", "fp16") if (ds_config.get(name) or {}).get("enabled") not in (None, False)),
                       None) or ("bf16" if bf16 else "fp16" if fp16 else None)
        how = (f"DeepSpeed {ds_half}: {ds_half} weights with fp32 master partitions in its optimizer" if ds_half
               else "DeepSpeed fp32")
        return f"precision: weights loaded as {dtypes}{saved}; {how}"
    if args.bf16_weights:
        return (f"precision: trainable weights {dtypes}{saved} with fp32 master weights and AdamW state "
                f"(--bf16_weights), no autocast")
    compute = "bf16 autocast" if bf16 else "fp16 autocast with loss scaling" if fp16 else "fp32"
    return f"precision: trainable weights train in {dtypes}{saved}; compute {compute}; AdamW state float32"


# ---------------------------------------------------------------- --bf16_weights: fp32 master weights

# At most this many gradient elements are upcast to float32 at once (256 MiB): the step walks the parameters
# in groups this size, so the upcast copies never take 4 bytes per parameter of the whole model at once.
UPCAST_ELEMENTS = 2 ** 26


def element_groups(params: list[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive index groups of `params` holding at most `limit` elements each (a larger tensor alone)."""
    groups, current, size = [], [], 0
    for i, p in enumerate(params):
        if current and size + p.numel() > limit:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += p.numel()
    if current:
        groups.append(current)
    return groups


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW for low-precision (bf16) parameters, stepping fp32 master copies: each parameter's state holds
    its fp32 master weight and fp32 moments; a step adds the gradient (upcast) to the master, and the
    master, rounded, is copied back into the parameter. So updates smaller than a bf16 ulp of the weight
    accumulate instead of vanishing. The masters start from the bf16 weights as loaded (the precision lost
    in that first rounding does not come back). State dicts (checkpoints, --resume) carry the masters.
    Gradients are upcast `upcast_elements` at a time, which bounds the step's extra memory."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None, upcast_elements: int = UPCAST_ELEMENTS):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused
        self.upcast_elements = upcast_elements

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["master"] = p.detach().float().clone()
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
            # fused kernels want the step count on the parameter's device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for indices in element_groups(params, self.upcast_elements):
                part = [params[i] for i in indices]
                states = [self._state_of(p) for p in part]
                masters = [s["master"] for s in states]
                adamw(masters, [p.grad.float() for p in part], [s["exp_avg"] for s in states],
                      [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=self.fused or None,
                      amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                      weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                torch._foreach_copy_(part, masters)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point state to each parameter's dtype: that would round the fp32 masters
        # and moments of a resumed run to bf16, so they are put back as saved.
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, i in zip(params, saved_ids):
            saved = state_dict["state"].get(i)
            if saved:
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)
                self.state[p]["step"] = saved["step"].to(device=p.device if self.fused else "cpu")


def master_weight_optimizer(training_args) -> tuple[type, dict]:
    """(class, keywords) of --bf16_weights' optimizer, with the Trainer's AdamW settings (it groups the
    parameters for weight decay itself); fused on a GPU when --optim asks for a fused AdamW."""
    fused = torch.cuda.is_available() and "fused" in str(training_args.optim)
    return MasterWeightAdamW, dict(lr=training_args.learning_rate, betas=(training_args.adam_beta1, training_args.adam_beta2),
                                   eps=training_args.adam_epsilon, fused=fused)


# ---------------------------------------------------------------- memory, said at start

@dataclass
class MemoryPlan:
    """Bytes per process for the model's weights, gradients and optimizer state (activations come on top)."""
    weights: int
    gradients: int
    optimizer: int
    transient: int = 0           # the optimizer step's largest temporary (MasterWeightAdamW's upcast gradients)
    where: str = "per process"

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.transient

    def line(self) -> str:
        extra = f" + up to {self.transient / GIB:.2f} GiB during the optimizer step" if self.transient else ""
        return (f"memory {self.where}, before activations: weights {self.weights / GIB:.2f} GiB, gradients "
                f"{self.gradients / GIB:.2f} GiB, optimizer state {self.optimizer / GIB:.2f} GiB{extra}; "
                f"peak at least {self.total / GIB:.2f} GiB")


def memory_plan(model: torch.nn.Module, args, world: int, ds_config: dict | None) -> MemoryPlan:
    """What weights, gradients and AdamW state take, from the parameters as loaded and the run's settings."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    if ds_config is not None:
        # 16-bit weights and gradients with fp32 masters and moments (12 bytes per parameter), or fp32 and
        # moments (8): ZeRO stage 1 splits the optimizer state over the ranks, 2 also the gradients, 3 the weights
        zero = ds_config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        n_all = sum(p.numel() for p in params)
        half = any((ds_config.get(name) or {}).get("enabled") not in (None, False) for name in ("bf16", "fp16"))
        width, split = (2 if half else 4), (lambda n, at: n // max(1, world) if stage >= at else n)
        where = f"per rank of {world} under ZeRO-{stage}"
        offloaded = [what for what in ("param", "optimizer")
                     if (zero.get(f"offload_{what}") or {}).get("device") in ("cpu", "nvme")]
        if offloaded:
            where += f" (offloaded to CPU memory: {', '.join(offloaded)})"
        return MemoryPlan(split(width * n_all, 3), split(width * n_trainable, 2),
                          split((12 if half else 8) * n_trainable, 1), where=where)
    if args.bf16_weights:
        largest = max((p.numel() for p in trainable), default=0)
        transient = 4 * min(n_trainable, max(UPCAST_ELEMENTS, largest))
        return MemoryPlan(weights, gradients, 12 * n_trainable, transient)
    return MemoryPlan(weights, gradients, 8 * n_trainable)
