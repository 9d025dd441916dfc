"""Test-time training (TTT-Linear) low-rank adapter: a fast weight trained online at inference.

After Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"
(TTT-Linear), used as a LoRA-style adapter on a linear map d_in -> d_out.

Slow weights (trained by ordinary backprop, through the inner updates): theta_K, theta_V, theta_Q
(each r x d_in, the low-rank "down" projections) and the up-projection U (d_out x r, initialised to
zero). Fast weight: an r x r core W per sequence (state shape (B, r, r)), so the adapter is
x -> U W_t theta_Q x, a LoRA whose middle factor is learned at test time.

Per token x_t (rows of x (B, T, d_in)):

    k_t = theta_K x_t,  v_t = theta_V x_t,  q_t = theta_Q x_t
          (k_t and q_t divided by their L2 norm when normalize=True, the default)
    l(W; x_t)      = ||W k_t - v_t||^2                             inner (self-supervised) loss
    grad_W l       = 2 (W k_t - v_t) k_t^T                         closed form (:func:`inner_grad`)

Mini-batch TTT (mini-batch size b, tokens grouped b at a time from the start of the stream; the
last mini-batch may be partial). With W_a the weight at the end of the previous mini-batch (the
"anchor", W_a = W_0 for the first) and n the number of tokens of the current mini-batch seen up to
and including t, every gradient is taken at the anchor:

    W_t = W_a - eta / n * sum_{s = t-n+1}^{t} grad_W l(W_a; x_s)     (a GD step on the mean loss)

and the anchor moves to W_t when the mini-batch is full (n = b). With b = 1 this is plain online
gradient descent, W_t = W_{t-1} - eta grad_W l(W_{t-1}; x_t). (Sun et al. sum the gradients with a
per-token learning rate; the running mean used here keeps one step size eta for every b. With unit
keys the mini-batch mean of k k^T has eigenvalues <= 1, so 0 < eta < 1 contracts the inner loss.)

Read / write order: WRITE THEN READ. Token t first contributes its gradient, then is read with the
updated weight,

    z_t = W_t q_t,   y_t = base(x_t) + U z_t       (wrapping a linear: ``TTTAdapter.wrap``)
                     y_t = x_t + U z_t              (residual on a feature vector, base None)

Causal: z_t depends on x_1..x_t only. Dual form (what :func:`ttt_linear` computes per mini-batch,
rows are tokens, E_s = W_a k_s - v_s, G_0 the gradient sum carried into a partial mini-batch):

    Z = Q W_a^T - (eta / n) ⊙ (Q G_0^T + 2 tril(Q K^T) E)
    G_end = G_0 + 2 E^T K

The online (pre-write) inner loss l(W_{t-1}; x_t) of each token, the error of the fast weight on a
token before learning from it, is returned per token; it falls along a stream as W fits it.

W_0 = 0 by default (``learn_init=False``): then eta = 0 keeps W_t = 0 and the adapter adds exactly
nothing (y = base(x)), and with U = 0 at initialisation the adapter output is zero for any eta, so
wrapping a pretrained layer changes nothing before training. ``learn_init=True`` makes W_0 a
parameter (initialised to 0): eta = 0 is then a static LoRA U W_0 theta_Q.

State (:class:`TTTState`) is per batch item: item i's outputs never depend on item j's inputs.
``forward(x, state=None) -> (y, state)`` is functional: state None starts a fresh stream (W_0); pass
the returned state to continue it; any split of a stream into calls gives the same outputs as one
call (a partial mini-batch is carried in the state). ``step(x)`` / ``adapt(stream)`` are the
stateful conveniences: the module holds the state between calls; ``reset()`` drops it so the next
call starts a new stream from W_0 (``adapt`` resets first unless told not to).

Padding: ``forward(x, state, mask)`` with mask (B, T) True at real tokens. Each item's stream is its
own real tokens in order (padding left, right or inside); mini-batches are counted per item (the
state's count becomes a (B,) tensor), padded tokens never change W, G or the anchor, their z is 0
(y = base(x) there) and their inner loss is left out of ``inner_loss``. A padded batch therefore
equals each sequence run alone, on the real outputs and on the final state.

Outer training: a task loss on y (backprop through every inner update reaches theta_K, theta_V,
theta_Q, U and W_0), optionally + lambda * mean online inner loss (``state.inner_loss``).
State math runs in float32 (float64 for float64 inputs) with autocast disabled.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from .fast_weights import _graph_capture

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
        else contextlib.nullcontext()


@dataclass
class TTTState:
    """Per-sequence fast-weight state. All tensors have a leading batch dim B.

    weight    W_t, the current fast weight (B, r, r), what the next read would use before its write
    anchor    W_a, the weight at the end of the last full mini-batch (B, r, r)
    grad_sum  G, sum of the gradients (at W_a) of the current partial mini-batch (B, r, r)
    count     n, tokens in the current partial mini-batch (0 <= n < b): an int shared by every item,
              or a (B,) int64 tensor once a padding mask was used (items then differ)
    tokens    real tokens seen since the stream started (int, or (B,) tensor like count)
    token_loss  online inner loss l(W_{t-1}; x_t) of the last call's tokens (B, T) (0 at padding), or None
    token_mask  the last call's padding mask (B, T) (True at real tokens), or None (all real)
    """

    weight: Tensor
    anchor: Tensor
    grad_sum: Tensor
    count: int | Tensor = 0
    tokens: int | Tensor = 0
    token_loss: Tensor | None = None
    token_mask: Tensor | None = None

    @property
    def inner_loss(self) -> Tensor:
        """Mean online inner loss of the last call's real tokens (a scalar; 0 before any call)."""
        if self.token_loss is None:
            return self.weight.new_zeros(())
        if self.token_mask is None:
            return self.token_loss.mean()
        m = self.token_mask.to(self.token_loss.dtype)
        return (self.token_loss * m).sum() / m.sum().clamp_min(1.0)

    def detach(self) -> TTTState:
        """The same state cut from the autograd graph (truncated backprop through a long stream)."""
        return TTTState(self.weight.detach(), self.anchor.detach(), self.grad_sum.detach(), self.count,
                        self.tokens, None if self.token_loss is None else self.token_loss.detach(), self.token_mask)


def inner_loss(W: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """l(W; k, v) = ||W k - v||^2 for W (..., r_v, r_k), k (..., r_k), v (..., r_v) -> (...)."""
    return ((W @ k[..., None])[..., 0] - v).pow(2).sum(-1)


def inner_grad(W: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Closed-form grad_W l(W; k, v) = 2 (W k - v) k^T -> (..., r_v, r_k)."""
    err = (W @ k[..., None])[..., 0] - v
    return 2.0 * err[..., :, None] * k[..., None, :]


def initial_state(w0: Tensor, batch: int) -> TTTState:
    """A fresh stream: W = W_a = w0 (r, r) broadcast to (B, r, r), G = 0, n = 0."""
    W = w0.expand(batch, *w0.shape[-2:])
    return TTTState(W, W, torch.zeros_like(W), 0, 0, None)


def ttt_linear_recurrent(q: Tensor, k: Tensor, v: Tensor, eta: float, w0: Tensor,
                         mini_batch_size: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Token-by-token reference of the mini-batch update (module doc), with autograd-free clarity.

    q, k (B, T, r_k), v (B, T, r_v), w0 (r_v, r_k) or (B, r_v, r_k). Returns (z (B, T, r_v),
    final W (B, r_v, r_k), online loss l(W_{t-1}; x_t) (B, T)).
    """
    B, T, _ = q.shape
    anchor = w0.expand(B, *w0.shape[-2:])
    G = torch.zeros_like(anchor)
    n = 0
    W = anchor
    zs, losses = [], []
    for t in range(T):
        W_prev = anchor - eta * G / n if n else anchor
        losses.append(inner_loss(W_prev, k[:, t], v[:, t]))
        G = G + inner_grad(anchor, k[:, t], v[:, t])             # write: gradient at the anchor
        n += 1
        W = anchor - eta * G / n
        zs.append((W @ q[:, t, :, None])[..., 0])                # read after write
        if n == mini_batch_size:
            anchor, G, n = W, torch.zeros_like(G), 0
    return torch.stack(zs, 1), W, torch.stack(losses, 1)


def _chunk(q: Tensor, k: Tensor, v: Tensor, eta: float, anchor: Tensor, G0: Tensor,
           p: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dual form of c tokens inside ONE mini-batch that already holds p tokens (gradient sum G0).

    Returns (z (B, c, r_v), G_end (B, r_v, r_k), online loss (B, c)).
    """
    c = q.shape[1]
    n = torch.arange(p + 1, p + c + 1, device=q.device, dtype=q.dtype)       # tokens seen incl. t
    E = k @ anchor.transpose(-1, -2) - v                                    # (B, c, r_v): W_a k_s - v_s
    tri = torch.ones(c, c, device=q.device, dtype=torch.bool).tril()
    A = (q @ k.transpose(-1, -2)).masked_fill(~tri, 0.0)                     # tril(Q K^T), diag incl.
    Z = q @ anchor.transpose(-1, -2) - (eta / n)[:, None] * (q @ G0.transpose(-1, -2) + 2.0 * A @ E)
    # pre-write prediction W_{t-1} k_t: strictly-lower sum over s < t, n_{t-1} = n - 1 (W_a when 0)
    Ak = (k @ k.transpose(-1, -2)).masked_fill(~tri.tril(-1), 0.0)
    n_prev = (n - 1).clamp_min(1.0)
    P = k @ anchor.transpose(-1, -2) - (eta / n_prev)[:, None] * (k @ G0.transpose(-1, -2) + 2.0 * Ak @ E)
    loss = (P - v).pow(2).sum(-1)
    G_end = G0 + 2.0 * E.transpose(-1, -2) @ k
    return Z, G_end, loss


def ttt_linear(q: Tensor, k: Tensor, v: Tensor, eta: float, state: TTTState,
               mini_batch_size: int = 1, mask: Tensor | None = None) -> tuple[Tensor, TTTState]:
    """Mini-batch TTT-Linear over a chunk of a stream, continuing ``state`` (dual form per mini-batch).

    q, k (B, T, r_k), v (B, T, r_v). Equal to :func:`ttt_linear_recurrent` for the concatenated
    stream however it is split into calls. Returns (z (B, T, r_v), new state with token_loss (B, T)).
    mask (B, T), True / 1 at real tokens: each item sees only its own real tokens, in order, as its
    stream (see :func:`ttt_linear_masked`); padded tokens get z = 0 and loss 0.
    """
    b = int(mini_batch_size)
    if b < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if mask is not None or isinstance(state.count, Tensor):
        return ttt_linear_masked(q, k, v, eta, state, b, mask)
    T = q.shape[1]
    anchor, G, n = state.anchor, state.grad_sum, state.count
    zs, losses = [], []
    t = 0
    while t < T:
        c = min(b - n, T - t)
        z, G, loss = _chunk(q[:, t:t + c], k[:, t:t + c], v[:, t:t + c], eta, anchor, G, n)
        zs.append(z)
        losses.append(loss)
        n += c
        t += c
        if n == b:
            anchor, G, n = anchor - eta * G / n, torch.zeros_like(G), 0
    weight = anchor - eta * G / n if n else anchor
    z = torch.cat(zs, 1) if zs else q.new_zeros(q.shape[0], 0, v.shape[-1])
    loss = torch.cat(losses, 1) if losses else q.new_zeros(q.shape[0], 0)
    return z, TTTState(weight, anchor, G, n, state.tokens + T, loss)


def ttt_linear_masked(q: Tensor, k: Tensor, v: Tensor, eta: float, state: TTTState, mini_batch_size: int,
                      mask: Tensor | None = None) -> tuple[Tensor, TTTState]:
    """:func:`ttt_linear` for variable-length batches: per-item mini-batch counts, padded tokens skipped.

    Item i's real tokens (mask True, any positions: left, right or interior padding) form its stream,
    which continues from its own count n0_i (state.count, int or (B,)). They are gathered, in order,
    into an aligned slot layout in which slot p holds the (p - n0_i)-th real token, so mini-batch j is
    slots [j b, (j + 1) b) for every item; slots before n0_i stand for the tokens already summed in
    G_0, slots after the item's last token are empty (k = v = 0: they add nothing to G or to any read).
    Mini-batch j then runs the dual form of :func:`_chunk` with n = slot index + 1, and the anchor of
    item i moves only where its mini-batch is full. Outputs are scattered back to the real positions.
    So a padded batch equals each sequence run alone, and padding never touches any state.
    """
    b = int(mini_batch_size)
    B, T, r_k = q.shape
    r_v = v.shape[-1]
    dev = q.device
    m = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
    n0 = state.count if isinstance(state.count, Tensor) else torch.full((B,), int(state.count), dtype=torch.long)
    n0 = n0.to(dev, torch.long)
    L = m.sum(1)
    end = n0 + L                                                         # slots used per item
    if _graph_capture() and not isinstance(state.count, Tensor):       # no host sync: the static bound (extra
        n_mb = -(-(int(state.count) + T) // b)                           # mini-batches are empty slots: no-ops)
    else:
        n_mb = int(-(-int(end.max()) // b)) if B else 0                  # ceil(max end / b)
    rank = m.long().cumsum(1) - 1                                        # index among the real tokens
    slot = torch.where(m, n0[:, None] + rank, torch.zeros_like(rank))
    Tp = n_mb * b
    src = torch.full((B, Tp + 1), T, dtype=torch.long, device=dev)      # slot -> token (T: empty)
    src.scatter_(1, torch.where(m, slot, torch.full_like(slot, Tp)), torch.arange(T, device=dev).expand(B, T))
    src = src[:, :Tp]
    filled = src < T                                                     # (B, Tp)

    def gather(x: Tensor) -> Tensor:
        xz = torch.cat([x, x.new_zeros(B, 1, x.shape[-1])], 1)
        return xz.gather(1, src[..., None].expand(-1, -1, x.shape[-1]))

    qs, ks, vs = gather(q), gather(k), gather(v)
    anchor, G = state.anchor.expand(B, r_v, r_k), state.grad_sum.expand(B, r_v, r_k)
    zs, losses = [], []
    for j in range(n_mb):
        sl = slice(j * b, (j + 1) * b)
        z, G_end, loss = _chunk(qs[:, sl], ks[:, sl], vs[:, sl], eta, anchor, G, 0)
        zs.append(z)
        losses.append(loss)
        full = filled[:, (j + 1) * b - 1, None, None]
        anchor = torch.where(full, anchor - eta * G_end / b, anchor)
        G = torch.where(full, torch.zeros_like(G_end), G_end)
    count = end % b
    weight = torch.where((count > 0)[:, None, None], anchor - eta * G / count.clamp_min(1)[:, None, None].to(G.dtype),
                         anchor)
    mf = m.to(q.dtype)
    if n_mb:
        zslot, lslot = torch.cat(zs, 1), torch.cat(losses, 1)
        z = zslot.gather(1, slot[..., None].expand(-1, -1, r_v)) * mf[..., None]
        loss = lslot.gather(1, slot) * mf
    else:
        z, loss = q.new_zeros(B, T, r_v), q.new_zeros(B, T)
    tokens = state.tokens + L if isinstance(state.tokens, Tensor) else int(state.tokens) + L
    return z, TTTState(weight, anchor, G, count, tokens, loss, m)


class TTTAdapter(nn.Module):
    """LoRA-style adapter whose r x r core is a TTT-Linear fast weight (module doc for the equations).

    Args:
        d_in, d_out: the adapted map's sizes (d_out defaults to d_in; the residual mode needs equal).
        rank: r, the size of the fast weight (B, r, r).
        base: the wrapped map (``y = base(x) + U z``); None: residual on the input (``y = x + U z``).
        eta: inner learning rate (0 disables test-time learning; with W_0 = 0 the adapter is then off).
        mini_batch_size: b, tokens per inner gradient step.
        normalize: L2-normalise k and q (keeps 0 < eta < 1 stable whatever theta_K learns).
        learn_init: W_0 a parameter (else fixed 0).
        bias: affine slow projections (k = theta_K x + c_K, ...); a bias lets W capture stream means.
    """

    def __init__(self, d_in: int, d_out: int | None = None, rank: int = 8, *, base: nn.Module | None = None,
                 eta: float = 0.5, mini_batch_size: int = 1, normalize: bool = True, learn_init: bool = False,
                 bias: bool = False):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if base is None and d_out != d_in:
            raise ValueError(f"residual TTTAdapter needs d_out == d_in (got {d_in} -> {d_out}); pass base=")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.base = base
        self.eta = float(eta)
        self.mini_batch_size = int(mini_batch_size)
        self.normalize = normalize
        self.theta_k = nn.Linear(d_in, rank, bias=bias)
        self.theta_v = nn.Linear(d_in, rank, bias=bias)
        self.theta_q = nn.Linear(d_in, rank, bias=bias)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.up.weight)                    # adapter output 0 at initialisation
        w0 = torch.zeros(rank, rank)
        if learn_init:
            self.w0 = nn.Parameter(w0)
        else:
            self.register_buffer("w0", w0, persistent=False)
        self.state: TTTState | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int = 8, *, freeze_base: bool = False, **kwargs) -> TTTAdapter:
        """Adapter around an existing linear layer; at initialisation it computes exactly linear(x)."""
        if freeze_base:
            for p in linear.parameters():
                p.requires_grad_(False)
        return cls(linear.in_features, linear.out_features, rank, base=linear, **kwargs)

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v = theta_Q x, theta_K x, theta_V x (q, k unit-normalised when normalize)."""
        q, k, v = self.theta_q(x), self.theta_k(x), self.theta_v(x)
        if self.normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v

    def init_state(self, batch: int) -> TTTState:
        """Fresh per-item state: W = W_0 for each of the batch items."""
        return initial_state(self.w0, batch)

    def delta(self, x: Tensor, state: TTTState | None = None,
              mask: Tensor | None = None) -> tuple[Tensor, TTTState]:
        """The adapter's contribution U z alone: x (B, T, d_in) or (B, d_in) -> (B, T, d_out) / (B, d_out).

        mask (B, T) (or (B,) for a single token), True at real tokens: padded tokens neither update
        their item's fast weight nor get a contribution (0 there), see :func:`ttt_linear_masked`.
        """
        single = x.dim() == 2
        xs = x[:, None] if single else x
        if mask is not None and single:
            mask = mask[:, None]
        if state is None:
            state = self.init_state(xs.shape[0])
        dt = _compute_dtype(xs.dtype)
        with _no_autocast(xs):
            q, k, v = (t.to(dt) for t in self.projections(xs.to(dt)))
            st = TTTState(state.weight.to(dt), state.anchor.to(dt), state.grad_sum.to(dt), state.count, state.tokens)
            z, state = ttt_linear(q, k, v, self.eta, st, self.mini_batch_size, mask)
            out = F.linear(z, self.up.weight.to(dt)).to(x.dtype)
        return (out[:, 0] if single else out), state

    def forward(self, x: Tensor, state: TTTState | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, TTTState]:
        """y = base(x) + U z (or x + U z); returns (y, state). state None starts a new stream.

        mask: padding mask (module doc of :meth:`delta`); at padded tokens y = base(x) (or x).
        """
        d, state = self.delta(x, state, mask)
        return (self.base(x) if self.base is not None else x) + d, state

    # -- stateful streaming ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the held stream state: the next ``step`` / ``adapt`` starts from W_0."""
        self.state = None

    def step(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Process the next chunk of the held stream (starting one if none is held); returns y."""
        y, self.state = self(x, self.state, mask)
        return y

    def adapt(self, stream: Iterable[Tensor], reset: bool = True) -> Tensor:
        """Run chunks (B, T_i, d_in) or single tokens (B, d_in) of one stream in order, learning online.

        Resets first unless ``reset=False`` (then continues the held stream). Returns the outputs
        concatenated along time, (B, sum T_i, d_out).
        """
        if reset:
            self.reset()
        outs = [self.step(x) for x in stream]
        outs = [o[:, None] if o.dim() == 2 else o for o in outs]
        return torch.cat(outs, 1)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, eta={self.eta}, "
                f"mini_batch_size={self.mini_batch_size}, normalize={self.normalize}, base={self.base is not None}")
