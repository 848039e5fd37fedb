"""GPT-2 checkpoints as Hugging Face keeps them (on the hub, or as transformers' save_pretrained
writes them), read into model.GPT and written back; the module names are model.py's already.
Everything that cannot be read is a ValueError naming the path."""
import json
import os

import torch

from model import GPT, GPTConfig, padded_vocab
from machinery.safe import one_line

try:  # optional: Hugging Face's model.safetensors files, read and written when it is there
    import safetensors.torch as safetensors_torch
except ImportError:
    safetensors_torch = None


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, on the hub
# the weights that GPT-2 keeps in Conv1D layout, (in, out)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read(path):
    """The dict in a JSON file or a weights file ({name: tensor}); torch.load reads with
    weights_only, so that a pickle cannot run code."""
    js, st = path.endswith(".json"), path.endswith(".safetensors")
    if st and safetensors_torch is None:
        raise ValueError(f"{path}: reading .safetensors needs the safetensors package: "
                         "pip install safetensors")
    try:
        with open(path, "rb") as f:
            x = (json.load(f) if js else safetensors_torch.load_file(path) if st
                 else torch.load(f, map_location="cpu", weights_only=True))
    except Exception as e:  # a missing, truncated or foreign file: any error its reader raises
        raise ValueError(f"{path}: not a readable {'JSON' if js else 'weights'} file ({one_line(e)})") from e
    if not isinstance(x, dict) or not (js or all(isinstance(v, torch.Tensor) for v in x.values())):
        raise ValueError(f"{path}: not {'a JSON object' if js else 'a state dict of tensors'}")
    return x


def _read_gpt2(path):
    """(config.json's dict, state dict without the `transformer.` prefix) of a GPT-2: a weights
    file with config.json beside it, a save_pretrained directory (one file, or the shards its
    index.json names), or one of GPT2_NAMES, downloaded into huggingface_hub's cache."""
    # model.safetensors first, as transformers does, when it can be read; without the package
    # a .bin beside it serves, and a lone .safetensors asks for it
    names = ("model.safetensors", "pytorch_model.bin")[::1 if safetensors_torch else -1]
    if not os.path.exists(path) and path not in GPT2_NAMES:
        raise ValueError(f"{path}: no such file or directory, and not one of {', '.join(GPT2_NAMES)}")
    if not os.path.exists(path):
        repo = f"openai-community/{path}"
        try:
            from huggingface_hub import hf_hub_download  # `datasets` brings it
            hf_hub_download(repo, "config.json")
            path = os.path.dirname(hf_hub_download(repo, names[0]))
        except Exception as e:  # no package, no network, no such file: the user's fix is the same
            raise ValueError(f"{path}: could not download it from the Hugging Face hub "
                             f"({type(e).__name__}); download config.json and {names[0]} from "
                             f"https://huggingface.co/{repo} into a directory and pass its path") from e
    files = [path]
    if os.path.isdir(path):
        found = [n for n in names if os.path.isfile(os.path.join(path, n))
                 or os.path.isfile(os.path.join(path, n + ".index.json"))]
        if not found:
            raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
        files = [os.path.join(path, found[0])]
        if not os.path.isfile(files[0]):  # shards
            shards = _read(files[0] + ".index.json").get("weight_map", {}).values()
            files = [os.path.join(path, s) for s in sorted(set(shards))]
    config = os.path.join(os.path.dirname(files[0]), "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{path}: no config.json beside the weights, and a GPT-2's shape is read from it")
    hf = _read(config)
    sd = {}
    for f in files:
        sd.update(_read(f))
    return hf, {k.removeprefix("transformer."): v for k, v in sd.items()}  # as GPT2Model names them


@torch.no_grad()
def load_weights(model, sd):
    """Copy a GPT-2 state dict, as _read_gpt2 gives it, into model, checking that every tensor
    is used and every shape fits; ValueError names the first that does not."""
    sd = {k: v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # the causal mask buffers
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, sd.get("wte.weight", head)):
        raise ValueError("lm_head.weight differs from wte.weight, and this GPT ties them")
    own = model.state_dict()  # views of the parameters: copying into them loads the model
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"GPT-2 tensor {k!r} has no place in this model")
        dst = own[k]
        if k.endswith(CONV1D):
            v = v.t()  # Conv1D (in, out) -> Linear (out, in)
        elif k == "wte.weight":  # the real ids' rows; the padding rows are zeroed
            dst = own[k][:model.n_vocab]
            own[k][model.n_vocab:] = 0
        elif k == "wpe.weight":  # a shorter block keeps the first positions
            v = v[:model.cfg.block_size]
        if dst.shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(dst.shape)}")
        if not torch.isfinite(v).all():  # weights of a run that diverged: named, not used
            raise ValueError(f"{k} holds NaN or inf: the weights are not finite")
        dst.copy_(v)
    missing = set(own) - set(sd) - {"lm_head.weight"}  # lm_head is wte
    if missing:
        raise ValueError(f"GPT-2 state dict lacks {sorted(missing)}")


def from_pretrained(name_or_path, block_size=1024, dropout=0.0):
    """A GPT-2 from wherever it is kept (_read_gpt2), of the shape its config.json gives."""
    hf, sd = _read_gpt2(name_or_path)
    try:  # what does not fit is named after name_or_path, below
        kind = hf.get("model_type", "gpt2"), hf.get("activation_function", "gelu_new")
        if kind[0] != "gpt2" or kind[1] not in ("gelu_new", "gelu_pytorch_tanh"):  # one tanh GELU
            raise ValueError(f"config.json describes a {kind[0]} with {kind[1]}: no GPT-2")
        keys = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        try:
            n_layer, n_head, n_embd, n_positions, n_vocab = (int(hf[k]) for k in keys)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"config.json lacks a GPT-2 size ({one_line(e)})") from e
        if n_embd % n_head or n_layer < 1:
            raise ValueError(f"{n_layer} layers of {n_embd} channels in {n_head} heads is no GPT-2")
        if block_size > n_positions:
            raise ValueError(f"block_size {block_size} exceeds the checkpoint's {n_positions} positions")
        model = GPT(GPTConfig(block_size=block_size, vocab_size=padded_vocab(n_vocab),
                              n_vocab=n_vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              dropout=dropout, bias=True))
        load_weights(model, sd)
    except ValueError as e:
        raise ValueError(f"{name_or_path}: {e}") from e
    return model


@torch.no_grad()
def export_hf(model, out_dir, eot=None):
    """Write model as a directory that GPT2LMHeadModel.from_pretrained(out_dir) loads, with
    eot as the bos and eos id (GPT-2's convention)."""
    c = model.cfg
    if not c.bias:
        raise ValueError("export_hf needs bias=True: GPT-2 has a bias in every Linear and LayerNorm")
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(CONV1D):
            v = v.t()  # Linear (out, in) -> Conv1D (in, out)
        elif k in ("wte.weight", "lm_head.weight"):  # tied, but safetensors refuses shared memory
            v = v[:model.n_vocab]
        # a fresh contiguous CPU copy each: no file then holds a whole storage for a slice
        sd[k if k == "lm_head.weight" else "transformer." + k] = v.to("cpu").clone(
            memory_format=torch.contiguous_format)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
              "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": model.n_vocab,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "tie_word_embeddings": True}
    if eot is not None:
        config["bos_token_id"] = config["eos_token_id"] = eot
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
    st = os.path.join(out_dir, "model.safetensors")
    if safetensors_torch is not None:  # transformers' "format" check wants "pt"
        safetensors_torch.save_file(sd, st, metadata={"format": "pt"})
    elif os.path.exists(st):
        os.remove(st)  # an older export's: transformers would read it before the .bin
