"""Independent reference implementations for memfit's models, in PyTorch (Debian's
python3-torch 1.13, run with the system python3), written from the architectures'
definitions as Hugging Face transformers implements them: GPT-2, LLaMA, ViT and
BERT/RoBERTa. Weights are read from safetensors files with numpy, by their Hugging Face
names.

No memfit code is used here: tests compare memfit's logits and gradients with these.
"""
import json
import math
import struct

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- safetensors (numpy)
_NP = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
       "U8": np.uint8, "BOOL": np.bool_, "F16": np.float16}
_ST = {np.dtype(v): k for k, v in _NP.items()}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        arr = np.frombuffer(body[b:end], dtype=_NP[e["dtype"]]).reshape(e["shape"])
        out[name] = arr.copy()
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": _ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------- building blocks
# FAST = True swaps the written-out LayerNorm and activations for PyTorch's fused ops, as
# Hugging Face's modules use them (bench/python_peer.py times that variant).
FAST = False


def gelu(x, kind):
    if FAST:
        if kind in ("gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(x, approximate="tanh")
        if kind == "silu":
            return F.silu(x)
        if kind == "relu":
            return F.relu(x)
        return F.gelu(x)
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if kind == "silu":
        return x * torch.sigmoid(x)
    if kind == "relu":
        return torch.relu(x)
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    if FAST:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attention(q, k, v, causal, key_mask):
    """q: [B, H, S, D]; k, v: [B, H, Sk, D]; key_mask: [B, Sk] bool or None."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    neg = torch.finfo(s.dtype).min
    if causal:
        S, Sk = s.shape[-2], s.shape[-1]
        hidden = torch.ones(S, Sk, dtype=torch.bool).triu(1 + Sk - S)
        s = s.masked_fill(hidden, neg)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], neg)
    return torch.softmax(s, dim=-1) @ v


def heads(x, n):  # [B, S, n*D] -> [B, n, S, D]
    B, S, E = x.shape
    return x.view(B, S, n, E // n).transpose(1, 2)


def merge(x):  # [B, H, S, D] -> [B, S, H*D]
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, H * D)


class Params:
    """Weights by Hugging Face name, as leaf tensors that collect gradients."""

    def __init__(self, arrays):
        self.t = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True)
                  for k, v in arrays.items() if v.dtype.kind == "f"}

    def __getitem__(self, k):
        return self.t[k]

    def get(self, k):
        return self.t.get(k)


# ---------------------------------------------------------------- models
def gpt2(cfg, P, ids, mask):
    B, S = ids.shape
    H, eps, act = cfg["n_head"], cfg.get("layer_norm_epsilon", 1e-5), cfg.get("activation_function", "gelu_new")
    x = P["transformer.wte.weight"][ids] + P["transformer.wpe.weight"][torch.arange(S)]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
        qkv = h @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]  # Conv1D: x W + b
        q, k, v = qkv.split(cfg["n_embd"], dim=-1)
        a = merge(attention(heads(q, H), heads(k, H), heads(v, H), True, mask))
        x = x + a @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
        h = layer_norm(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
        m = gelu(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"], act)
        x = x + m @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"]
    x = layer_norm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], eps)
    head = P.get("lm_head.weight")
    return x @ (head if head is not None else P["transformer.wte.weight"]).t()


def llama(cfg, P, ids, mask):
    B, S = ids.shape
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hk = cfg.get("num_key_value_heads", H)
    D, eps, theta = d // H, cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    ang = torch.outer(torch.arange(S).float(), inv)
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rope(t):  # [B, H, S, D]
        half = D // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos + rot * sin

    x = P["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, P[p + "input_layernorm.weight"], eps)
        q = rope(heads(h @ P[p + "self_attn.q_proj.weight"].t(), H))
        k = rope(heads(h @ P[p + "self_attn.k_proj.weight"].t(), Hk))
        v = heads(h @ P[p + "self_attn.v_proj.weight"].t(), Hk)
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
        x = x + merge(attention(q, k, v, True, mask)) @ P[p + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, P[p + "post_attention_layernorm.weight"], eps)
        g = h @ P[p + "mlp.gate_proj.weight"].t()
        u = h @ P[p + "mlp.up_proj.weight"].t()
        x = x + (gelu(g, "silu") * u) @ P[p + "mlp.down_proj.weight"].t()
    x = rms_norm(x, P["model.norm.weight"], eps)
    head = P.get("lm_head.weight")
    return x @ (head if head is not None else P["model.embed_tokens.weight"]).t()


def vit(cfg, P, pixels):
    d, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("layer_norm_eps", 1e-12)
    ps = cfg["patch_size"]
    e = "vit.embeddings."
    x = F.conv2d(pixels, P[e + "patch_embeddings.projection.weight"], P[e + "patch_embeddings.projection.bias"],
                 stride=ps).flatten(2).transpose(1, 2)
    B = x.shape[0]
    x = torch.cat([P[e + "cls_token"].expand(B, 1, d), x], dim=1) + P[e + "position_embeddings"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"vit.encoder.layer.{i}."
        h = layer_norm(x, P[p + "layernorm_before.weight"], P[p + "layernorm_before.bias"], eps)
        a = p + "attention.attention."
        q = heads(h @ P[a + "query.weight"].t() + P[a + "query.bias"], H)
        k = heads(h @ P[a + "key.weight"].t() + P[a + "key.bias"], H)
        v = heads(h @ P[a + "value.weight"].t() + P[a + "value.bias"], H)
        x = x + merge(attention(q, k, v, False, None)) @ P[p + "attention.output.dense.weight"].t() \
            + P[p + "attention.output.dense.bias"]
        h = layer_norm(x, P[p + "layernorm_after.weight"], P[p + "layernorm_after.bias"], eps)
        m = gelu(h @ P[p + "intermediate.dense.weight"].t() + P[p + "intermediate.dense.bias"], cfg.get("hidden_act", "gelu"))
        x = x + m @ P[p + "output.dense.weight"].t() + P[p + "output.dense.bias"]
    x = layer_norm(x, P["vit.layernorm.weight"], P["vit.layernorm.bias"], eps)
    return x[:, 0] @ P["classifier.weight"].t() + P["classifier.bias"]


def bert(cfg, P, ids, mask, roberta=False):
    B, S = ids.shape
    H, eps = cfg["num_attention_heads"], cfg.get("layer_norm_eps", 1e-12)
    base = "roberta." if roberta else "bert."
    if roberta:
        pad = cfg.get("pad_token_id", 1)
        real = (ids != pad).long()
        pos = torch.cumsum(real, dim=1) * real + pad
    else:
        pos = torch.arange(S)[None, :].expand(B, S)
    e = base + "embeddings."
    x = P[e + "word_embeddings.weight"][ids] + P[e + "position_embeddings.weight"][pos]
    if P.get(e + "token_type_embeddings.weight") is not None:
        x = x + P[e + "token_type_embeddings.weight"][0]
    x = layer_norm(x, P[e + "LayerNorm.weight"], P[e + "LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"{base}encoder.layer.{i}."
        s = p + "attention.self."
        q = heads(x @ P[s + "query.weight"].t() + P[s + "query.bias"], H)
        k = heads(x @ P[s + "key.weight"].t() + P[s + "key.bias"], H)
        v = heads(x @ P[s + "value.weight"].t() + P[s + "value.bias"], H)
        a = merge(attention(q, k, v, False, mask)) @ P[p + "attention.output.dense.weight"].t() \
            + P[p + "attention.output.dense.bias"]
        x = layer_norm(x + a, P[p + "attention.output.LayerNorm.weight"], P[p + "attention.output.LayerNorm.bias"], eps)
        m = gelu(x @ P[p + "intermediate.dense.weight"].t() + P[p + "intermediate.dense.bias"], cfg.get("hidden_act", "gelu"))
        m = m @ P[p + "output.dense.weight"].t() + P[p + "output.dense.bias"]
        x = layer_norm(x + m, P[p + "output.LayerNorm.weight"], P[p + "output.LayerNorm.bias"], eps)
    cls = x[:, 0]
    if roberta:
        h = torch.tanh(cls @ P["classifier.dense.weight"].t() + P["classifier.dense.bias"])
        return h @ P["classifier.out_proj.weight"].t() + P["classifier.out_proj.bias"]
    h = torch.tanh(cls @ P[base + "pooler.dense.weight"].t() + P[base + "pooler.dense.bias"])
    return h @ P["classifier.weight"].t() + P["classifier.bias"]


def causal_lm_loss(logits, labels):
    l = logits[:, :-1].reshape(-1, logits.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return F.cross_entropy(l, y, ignore_index=-100)


def run(arch, cfg, weights, inputs):
    """Logits, loss, and gradients by name for one forward + backward."""
    P = Params(weights)
    if arch == "vit":
        logits = vit(cfg, P, torch.tensor(inputs["pixels"]))
        loss = F.cross_entropy(logits, torch.tensor(inputs["labels"]))
    else:
        ids = torch.tensor(inputs["input_ids"])
        mask = torch.tensor(inputs["attention_mask"]).bool() if "attention_mask" in inputs else None
        labels = torch.tensor(inputs["labels"])
        if arch == "gpt2":
            logits = gpt2(cfg, P, ids, mask)
            loss = causal_lm_loss(logits, labels)
        elif arch == "llama":
            logits = llama(cfg, P, ids, mask)
            loss = causal_lm_loss(logits, labels)
        else:
            logits = bert(cfg, P, ids, mask, roberta=(arch == "roberta"))
            loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {k: t.grad.numpy() for k, t in P.t.items() if t.grad is not None}
    return logits.detach().numpy(), float(loss), grads
