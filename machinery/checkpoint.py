"""Checkpoints (what resume needs to go on exactly as the uninterrupted run would), the model
a run starts from, and RunDir, a run's folder."""
import contextlib
import dataclasses
import json
import os
import shutil

import torch

from machinery import boot, gpt2
from machinery.cli import settings
from machinery.safe import atomic_write, die, lock, one_line
from model import GPT, GPTConfig, padded_vocab

# a checkpoint's fields (check_fields): sample.py, --export, --init_from=PATH read the first three
CKPT_FIELDS = dict(
    meta=dict(tokenizer=str, vocab_size=int, eot=int), model=dict,  # the weights and what they are
    model_args=dict(n_layer=int, n_head=int, n_embd=int, vocab_size=int, block_size=int), config=dict,
    optimizer=dict, scaler=dict, rng=list,                      # the training state, rng per process
    iter=int, epoch=int, pos=int,                                    # where the loop and the data are
    history=[dict.fromkeys(("iter", "ell_w", "ell_l", "log_or", "acc", "l_sft", "l_or", "margin"),
                           (int, float))], seconds=(int, float))   # what was measured so far
# the first release's names of a block's layers, without attn. and mlp.
FIRST_NAMES = dict(c_attn="attn.c_attn", c_proj="attn.c_proj", c_fc="mlp.c_fc", mlp_proj="mlp.c_proj")
# what a resumed run must share with the run it continues (the schedule: resume_state)
RESUME_SAME = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dataset", "data_file",
               "batch_size", "seed", "lam", "sft_on_prompt", "loss", "beta", "ref", "dropout",
               "grad_accum", "weight_decay", "beta1", "beta2", "grad_clip")
RUN_FILES = ("summary.json", "log.jsonl", "ckpt.pt")  # a run's, in out_dir: one run's at a time
SCHEDULE = ("lr", "min_lr", "warmup_iters")  # and where the cosine ends: lr_decay_iters or max_iters


def save_checkpoint(path, **state):
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def check_fields(path, x, spec, at=""):
    """The dict x holds spec's fields, each of its type ({...}: a dict with those fields, [s]:
    a list whose items are s); the first that does not is named, in one line."""
    an = lambda t: ("an " if t.__name__[0] in "aeiouAEIOU" else "a ") + t.__name__
    for k, want in spec.items():
        name, v = f"{at}[{k!r}]" if at else k, x.get(k)
        kind = type(want) if isinstance(want, (dict, list)) else want
        if not isinstance(v, kind):
            why = ("is missing" if k not in x else "is None" if v is None else f"is {an(type(v))}, "
                   f"not {an(kind) if isinstance(kind, type) else 'a number'}")
            die(f"{path}: {name} {why}")
        for i, item in enumerate(v if isinstance(want, list) else ()):
            check_fields(path, {i: item}, {i: want[0]}, name)
        if isinstance(want, dict):
            check_fields(path, v, want, name)


def load_checkpoint(path, meta=None):
    """A checkpoint whose meta, model and model_args are as CKPT_FIELDS says (an earlier
    release's read as this one's), and, given the data's meta, of its vocabulary."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        die(f"no checkpoint at {path}")
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({one_line(e, 100, typed=True)})")
    check_fields(path, {"the checkpoint": ck}, {"the checkpoint": {}})
    config = ck.get("config")
    if isinstance(config, dict) and "ratio" in config:  # before --loss named every objective
        ratio, logp = config.pop("ratio"), config.pop("logp", "mean")
        if config.get("loss") != "dpo":
            config["loss"] = "sum" if logp == "sum" else {"odds": "orpo"}.get(ratio, ratio)
    if "model_args" not in ck and all(isinstance(ck.get(k), dict) for k in ("config", "model", "meta")):
        # the first release's: the shape in its config, its layers named otherwise (FIRST_NAMES)
        shape = {f.name: config[f.name] for f in dataclasses.fields(GPTConfig) if f.name in config}
        ck["model_args"] = dict(shape, vocab_size=ck["meta"].get("vocab_size"))
        ck["model"] = {".".join(FIRST_NAMES.get(p, p) for p in k.split(".")): w
                       for k, w in ck["model"].items()}
    check_fields(path, ck, {k: CKPT_FIELDS[k] for k in ("meta", "model", "model_args")})
    ck["model_args"].pop("attn", None)  # how attention ran, in releases before it was SDPA alone
    args, n = ck["model_args"], ck["meta"]["vocab_size"]
    if (args.get("n_vocab") or args["vocab_size"]) != n:  # sampled ids its tokenizer lacks
        die(f"{path}: model_args has n_vocab={args.get('n_vocab')}, vocab_size={args['vocab_size']}, "
            f"but its tokenizer has {n} ids (meta['vocab_size'])")
    if meta is not None and n != meta["vocab_size"]:
        die(f"checkpoint {path} has vocab_size {n}, but the data has {meta['vocab_size']}")
    return ck


def check_same(path, have, want, who):
    for k, v in want.items():
        if have.get(k) != v:
            die(f"checkpoint {path} has {k}={have.get(k)}, but {who} {k}={v}")


def model_from_checkpoint(ck, path):
    """The GPT a checkpoint holds: its shape (model_args), its weights, all finite (NaN or inf,
    from a run that diverged, are named before they train, sample or export anything)."""
    for name, p in ck["model"].items():
        if isinstance(p, torch.Tensor) and p.is_floating_point() and not torch.isfinite(p).all():
            die(f"{path}: the weights are not finite ({name} holds NaN or inf); the run "
                f"that wrote them diverged: use an earlier checkpoint, or train anew")
    odd = sorted(set(ck["model_args"]) - {f.name for f in dataclasses.fields(GPTConfig)})
    if odd:  # a later release's
        die(f"{path}: model_args has unknown key {odd[0]!r}: a later release's, or not orpo.py's")
    try:
        model = GPT(GPTConfig(**ck["model_args"]))
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError, ValueError, AssertionError) as e:
        die(f"{path}: the weights do not fit the model: {one_line(str(e).strip().splitlines()[-1])}")
    return model


# ----------------------------------------------------------------------------------------
# The model to train, and DPO's frozen reference


def build_model(cfg, meta, path, ck=None):
    """The model to train: from scratch, resumed from the checkpoint ck (read from path),
    the weights of another run's checkpoint (.pt), or a pretrained GPT-2."""
    if ck is None and cfg.init_from.endswith(".pt"):  # e.g. DPO's second phase starts from SFT's
        path, ck = cfg.init_from, load_checkpoint(cfg.init_from, meta=meta)
    elif ck is not None and ck["meta"].get("id") != meta["id"]:  # resumed: the same names, other tokens
        die(f"checkpoint {path} was trained on other data than {cfg.data_dir or 'data/' + meta['source']} "
            f"holds now (data id {ck['meta'].get('id')}, now {meta['id']}); resume on that "
            f"data, or start a new --out_dir")
    if ck is not None:
        return model_from_checkpoint(ck, path)
    if cfg.init_from == "scratch":
        n_vocab = meta["vocab_size"]  # the tokenizer's; the embedding's rows are padded
        shape = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size or padded_vocab(n_vocab),
                          n_vocab=n_vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        try:
            return GPT(shape)
        except (RuntimeError, MemoryError) as e:  # the allocator's, in its own words
            die(f"the model does not fit in memory (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
                f"vocab_size={cfg.vocab_size}): {one_line(e, 100)}")
    if meta["tokenizer"] != "gpt2":
        die(f"--init_from={cfg.init_from} needs data tokenized with gpt2, but "
            f"{cfg.dataset} uses {meta['tokenizer']!r}")
    try:
        return gpt2.from_pretrained(cfg.init_from, cfg.block_size, cfg.dropout)
    except ValueError as e:  # unreadable, of another shape, or not finite
        die(str(e))


def load_reference(cfg, meta, policy):
    """DPO's frozen reference, --ref, of the policy's shape; in eval mode: it must not drop out."""
    ck = load_checkpoint(cfg.ref, meta=meta)
    shape = ("n_layer", "n_head", "n_embd", "vocab_size", "n_vocab")
    check_same(cfg.ref, ck["model_args"], {k: getattr(policy.cfg, k) for k in shape}, "the policy has")
    return model_from_checkpoint(ck, cfg.ref).requires_grad_(False).eval()


class RunDir(contextlib.AbstractContextManager):
    """A run's folder, out_dir, and its ckpt.pt. Used as `with RunDir(...) as run:` around a
    run: Ctrl-C or a non-finite loss inside is one line, and the lock is let go at the end."""

    def __init__(self, out_dir, rank):
        self.out_dir, self.master, self.held = out_dir, rank == 0, None
        self.path = os.path.join(out_dir, "ckpt.pt")
        boot.kept = self.kept  # a Ctrl-C that no handler catches (as a DDP peer ends) says it too

    def __exit__(self, kind, e, tb):
        try:
            if kind and issubclass(kind, KeyboardInterrupt):
                die(f"interrupted; {self.kept()}", 130)
        finally:
            if self.held:
                self.held.release()

    def kept(self, then=": go on with --init_from=resume"):
        """What the folder holds to go on from, read from the disk, for a last line."""
        try:
            ck = torch.load(self.path, map_location="cpu", mmap=True, weights_only=False)
            return f"{self.path} holds iteration {ck['iter']}{then}"
        except Exception:  # none, or unreadable: either way there is nothing to resume from
            return "no checkpoint was written yet"

    def hold(self):
        """The first process holds the folder; a second run is told which process does."""
        if not self.master or self.held:
            return
        try:
            self.held = lock(self.out_dir)
        except ValueError as e:
            die(f"--out_dir: {e}; wait for it to end, or give another --out_dir")

    def resume_state(self, cfg):
        """The checkpoint to resume from, read with the folder locked (so no run can write a
        newer one meanwhile) and before the data, or the one line that says why it cannot."""
        self.hold()
        ck = load_checkpoint(self.path)
        if "id" not in ck["meta"] or isinstance(ck.get("rng"), torch.Tensor):
            die(f"{self.path} is an older release's (no data id, one RNG state), which alone resumes "
                f"it; sample.py, --export and --init_from={self.path} still read it")
        check_fields(self.path, ck, CKPT_FIELDS)
        had = ck["config"]
        check_same(self.path, had, {k: getattr(cfg, k) for k in RESUME_SAME}, "the run asks for")
        if cfg.max_iters < ck["iter"]:
            die(f"{self.path} holds iteration {ck['iter']}, past --max_iters={cfg.max_iters}; "
                f"resume with --max_iters of {ck['iter']} or more")
        sched = lambda c: (*[c.get(k) for k in SCHEDULE], c.get("lr_decay_iters") or c.get("max_iters"))
        was, asks = sched(had), sched(dataclasses.asdict(cfg))  # as lr_at reads them
        if was != asks:
            said = lambda s: ", ".join(f"{k}={v}" for k, v in zip(SCHEDULE, s)) + f", cosine to {s[-1]}"
            die(f"{self.path} was trained on the schedule {said(was)}; the run asks for {said(asks)}. "
                f"To train on past it, keep the schedule with --lr_decay_iters={was[-1]}")
        if self.master and not os.path.exists(os.path.join(self.out_dir, "log.jsonl")):
            die(f"{self.out_dir}/log.jsonl is gone: it holds the evals and the samples before "
                f"iteration {ck['iter']}, which the summary needs; start a new --out_dir")
        return ck

    def claim(self, cfg, resume):
        """The first process locks the folder, and a new run never writes beside another run's
        files. An earlier run is moved aside to out_dir/previous when it had the same settings
        (the same command, run again), saved nothing to go on from (a log alone), or --fresh
        asks; otherwise the run is refused, in one line that names the ways on."""
        if not self.master:
            return
        self.hold()
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(self.out_dir, f))]
        if resume or not found:
            return
        try:
            with open(os.path.join(self.out_dir, "summary.json")) as f:
                had = json.load(f).get("settings")
        except (OSError, ValueError, AttributeError):
            had = None
        if not (cfg.fresh or had == settings(cfg) or found == ["log.jsonl"]):
            what = self.kept("") if "ckpt.pt" in found else f"its {', '.join(found)}"
            die(f"{self.out_dir} holds another run ({what}): continue it with --init_from=resume, "
                f"give another --out_dir, or start over with --fresh=true (the earlier run moves "
                f"to {self.out_dir}/previous)")
        # through previous.new, so that a move cut short is finished by the next one, and the
        # earlier run's files are never left beside a new run's
        new, prev = os.path.join(self.out_dir, "previous.new"), os.path.join(self.out_dir, "previous")
        os.makedirs(new, exist_ok=True)
        for n in RUN_FILES:
            if os.path.exists(os.path.join(self.out_dir, n)):
                os.replace(os.path.join(self.out_dir, n), os.path.join(new, n))
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(new, prev)
        print(f"{self.out_dir}: the earlier run there ({', '.join(found)}) is now in {prev}")

    def restore(self, ck, opt, scaler, rank, world, dev_type):
        """(iteration, epoch, position in it, eval history, seconds in the loop) to go on from,
        with the optimizer, the scaler and each process's RNG as they were. Of another number
        of processes, each keeps its seed's RNG where the checkpoint has none for it."""
        if not ck:
            return 0, 0, 0, [], 0.0
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if rank < len(ck["rng"]):
            cpu_rng, cuda_rng = ck["rng"][rank]
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None and dev_type == "cuda":
                torch.cuda.set_rng_state(cuda_rng)
        print(f"resumed from {self.path} at iteration {ck['iter']}")
        if len(ck["rng"]) != world and ck["config"].get("dropout") and self.master:
            print(f"note: {len(ck['rng'])} process(es) wrote it, {world} go on: the same batches, but "
                  f"the dropout masks differ from those the same processes would have drawn")
        return ck["iter"], ck["epoch"], ck["pos"], ck["history"], ck["seconds"]

    def save(self, raw, cfg, meta, opt, scaler, rng, **progress):
        """The checkpoint, whole or the last one kept; progress: iter, epoch, pos, history, seconds."""
        save_checkpoint(self.path, model=raw.state_dict(), model_args=dataclasses.asdict(raw.cfg),
                        config=dataclasses.asdict(cfg), meta=meta, optimizer=opt.state_dict(),
                        scaler=scaler.state_dict(), rng=rng, **progress)
