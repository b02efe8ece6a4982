# Type stub of the compiled module fastgrad._core (fastgrad/_core.pyx).
# Float arrays are float32 or float64, one dtype per call; matrices are
# C-contiguous. Outputs are written in place.
from typing import TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

_F = TypeVar("_F", np.float32, np.float64)
_Arr: TypeAlias = npt.NDArray[_F]

ACTIVATION_CODES: dict[str, int]
ACTIVATION_ALIASES: dict[str, str]
LAYERNORM_WORK: int
BLAS_ONE_THREAD: bool
ACTIVATIONS_NEEDING_PRE: frozenset[str]
LOSS_CODES: dict[str, int]
OPTIMIZER_CODES: dict[str, int]
CONSTRAINT_CODES: dict[str | None, int]
METRIC_CODES: dict[str, int]

def matmul(a: _Arr[_F], b: _Arr[_F], out: _Arr[_F], trans_a: bool = ...,
           trans_b: bool = ...) -> _Arr[_F]: ...
def bias_act_forward(inp: _Arr[_F], bias: _Arr[_F] | None, out: _Arr[_F],
                     pre: _Arr[_F] | None, act: int, alpha: float,
                     alive: npt.NDArray[np.uint8] | None = ...,
                     stats: bool = ...) -> int | None: ...
def act_backward(dout: _Arr[_F], out: _Arr[_F], pre: _Arr[_F] | None, dpre: _Arr[_F],
                 dbias: _Arr[_F] | None, act: int, alpha: float) -> _Arr[_F]: ...
def dense_forward(x: _Arr[_F], kernel: _Arr[_F], bias: _Arr[_F] | None, out: _Arr[_F],
                  pre: _Arr[_F] | None, act: int, alpha: float,
                  alive: npt.NDArray[np.uint8] | None = ...,
                  stats: bool = ...) -> int | None: ...
def dense_backward(dout: _Arr[_F], x: _Arr[_F], kernel: _Arr[_F], out: _Arr[_F],
                   pre: _Arr[_F] | None, dpre: _Arr[_F], dkernel: _Arr[_F],
                   dbias: _Arr[_F] | None, dx: _Arr[_F] | None, act: int,
                   alpha: float) -> None: ...
def loss_forward_backward(pred: _Arr[_F], target: _Arr[_F] | None,
                          labels: npt.NDArray[np.int64] | None, rows: _Arr[_F] | None,
                          dpred: _Arr[_F] | None, prob: _Arr[_F] | None, kind: int,
                          from_logits: bool, param: float, alpha: float = ...,
                          gamma: float = ..., class_balancing: bool = ...,
                          weights: _Arr[_F] | None = ...) -> float: ...
def sum_squares(x: _Arr[_F]) -> float: ...
def any_abs_above(x: _Arr[_F], limit: float) -> bool: ...

class DenseChain:
    def __init__(self, layers: list[tuple[object, ...]], rows: int) -> None: ...
    def forward(self, x: _Arr[_F], logits: bool = ...) -> _Arr[_F]: ...
    def backward(self, d: _Arr[_F]) -> None: ...

class TensorTable:
    offset: npt.NDArray[np.int64]
    l1: npt.NDArray[np.float64]
    l2: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    constraint: npt.NDArray[np.intc]
    cvalue: npt.NDArray[np.float64]
    cols: npt.NDArray[np.int64]
    frozen: npt.NDArray[np.uint8] | None
    upd_sumsq: npt.NDArray[np.float64] | None
    w_sumsq: npt.NDArray[np.float64] | None
    ratio: npt.NDArray[np.float64] | None
    size: int
    def __init__(self, offset: npt.NDArray[np.int64], l1: npt.NDArray[np.float64],
                 l2: npt.NDArray[np.float64], scale: npt.NDArray[np.float64],
                 constraint: npt.NDArray[np.intc], cvalue: npt.NDArray[np.float64],
                 cols: npt.NDArray[np.int64],
                 frozen: npt.NDArray[np.uint8] | None = ...) -> None: ...
    def track_updates(self, upd_sumsq: npt.NDArray[np.float64] | None,
                      w_sumsq: npt.NDArray[np.float64] | None,
                      ratio: npt.NDArray[np.float64] | None) -> None: ...

class StepConfig:
    clipnorm: float
    global_clipnorm: float
    needs_m: bool
    needs_v: bool
    needs_vmax: bool
    @property
    def kind(self) -> int: ...
    def __init__(self, kind: int, *, momentum: float = ..., rho: float = ...,
                 beta_1: float = ..., beta_2: float = ..., epsilon: float = ...,
                 weight_decay: float = ..., clipvalue: float = ..., clipnorm: float = ...,
                 global_clipnorm: float = ..., nesterov: bool = ..., centered: bool = ...,
                 amsgrad: bool = ...) -> None: ...

def grad_norms(sumsq: npt.NDArray[np.float64], norms: npt.NDArray[np.float64],
               grad: _Arr[_F], param: _Arr[_F], table: TensorTable,
               config: StepConfig, acc: _Arr[_F] | None = ...,
               acc_steps: float = ...) -> tuple[int, float, float, bool]: ...
def optimizer_step(param: _Arr[_F], m: _Arr[_F] | None, v: _Arr[_F] | None,
                   vmax: _Arr[_F] | None, grad: _Arr[_F], table: TensorTable,
                   config: StepConfig, lr: float, step: int, ema: _Arr[_F] | None = ...,
                   acc: _Arr[_F] | None = ..., accumulate: bool = ...,
                   ema_momentum: float = ..., ema_overwrite: bool = ...,
                   u_product: float = ...) -> int: ...
def batchnorm_forward(inp: _Arr[_F], gamma: _Arr[_F] | None, beta: _Arr[_F] | None,
                      moving_mean: _Arr[_F], moving_var: _Arr[_F], out: _Arr[_F],
                      mean: npt.NDArray[np.float64], rstd: npt.NDArray[np.float64],
                      epsilon: float, momentum: float, training: bool) -> _Arr[_F]: ...
def batchnorm_backward(dout: _Arr[_F], inp: _Arr[_F], mean: npt.NDArray[np.float64],
                       rstd: npt.NDArray[np.float64], gamma: _Arr[_F] | None,
                       dinp: _Arr[_F], dgamma: _Arr[_F] | None,
                       dbeta: _Arr[_F] | None) -> _Arr[_F]: ...
def dropout(inp: _Arr[_F], out: _Arr[_F], rate: float, seed: int, offset: int) -> _Arr[_F]: ...
def gaussian_noise(inp: _Arr[_F], out: _Arr[_F], stddev: float, multiply: bool, seed: int,
                   offset: int) -> _Arr[_F]: ...
def alpha_dropout(inp: _Arr[_F], out: _Arr[_F], rate: float, a: float, b_keep: float,
                  b_drop: float, seed: int, offset: int) -> _Arr[_F]: ...
def affine(inp: _Arr[_F], shift: _Arr[_F] | None, scale: _Arr[_F], out: _Arr[_F],
           divide: bool) -> _Arr[_F]: ...
def set_kernel_threads(n: int) -> None: ...
def get_kernel_threads() -> int: ...
def layernorm_forward(inp: _Arr[_F], gamma: _Arr[_F] | None, beta: _Arr[_F] | None,
                      out: _Arr[_F], mean: npt.NDArray[np.float64],
                      rstd: npt.NDArray[np.float64], epsilon: float) -> _Arr[_F]: ...
def layernorm_backward(dout: _Arr[_F], inp: _Arr[_F], mean: npt.NDArray[np.float64],
                       rstd: npt.NDArray[np.float64], gamma: _Arr[_F] | None, dinp: _Arr[_F],
                       dgamma: _Arr[_F] | None, dbeta: _Arr[_F] | None,
                       work: npt.NDArray[np.float64] | None) -> _Arr[_F]: ...
def relu_forward(inp: _Arr[_F], out: _Arr[_F], negative_slope: float, threshold: float,
                 max_value: float) -> _Arr[_F]: ...
def relu_backward(dout: _Arr[_F], inp: _Arr[_F], dinp: _Arr[_F], negative_slope: float,
                  threshold: float, max_value: float) -> _Arr[_F]: ...
def prelu_forward(inp: _Arr[_F], alpha: _Arr[_F], out: _Arr[_F]) -> _Arr[_F]: ...
def prelu_backward(dout: _Arr[_F], inp: _Arr[_F], alpha: _Arr[_F], dinp: _Arr[_F],
                   dalpha: _Arr[_F] | None) -> _Arr[_F]: ...
def label_range(y: npt.NDArray[np.int64]) -> tuple[int, int]: ...
def first_nonfinite_row(x: _Arr[_F]) -> int: ...
def metric_update(kind: int, pred: _Arr[_F], target: _Arr[_F] | None,
                  labels: npt.NDArray[np.int64] | None, weights: _Arr[_F] | None,
                  state: npt.NDArray[np.float64], param: float) -> None: ...
def confusion_update(pred: _Arr[_F], target: _Arr[_F], weights: _Arr[_F] | None,
                     thresholds: npt.NDArray[np.float64],
                     state: npt.NDArray[np.float64]) -> None: ...
def bucket_update(pred: _Arr[_F], target: _Arr[_F], weights: _Arr[_F] | None,
                  hist: npt.NDArray[np.float64]) -> None: ...
def auc_result(conf: npt.NDArray[np.float64], hist: npt.NDArray[np.float64] | None, pr: bool,
               method: int) -> float: ...
