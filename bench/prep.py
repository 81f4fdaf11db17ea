"""Dataset preparation throughput: rows/s of the old per-row path, the batched path on one core and on every
core, and TRL's own preparation.

    python -m bench.prep                                  # 20k synthetic zh/en rows, 32k BPE; ~2 min on 2 cores
    python -m bench.prep --rows 5000 --repeats 1          # quicker
    python -m bench.prep --real-data /work/shared/data    # rows drawn from the Alpaca .json files in a folder

Rows are Alpaca conversations, half English and half Chinese, of varied lengths (log-normal answers, a quarter
with one to three earlier turns, some with a system prompt); the tokenizer is a byte-level BPE trained on them
with `tokenizers`, carrying the ChatML template of tuneflow.modeling.demo. Each variant turns the validated
conversations into an Arrow dataset of input_ids / labels / prompt / reference; the best of --repeats runs is reported
(this machine may be shared). Writes bench/results-prep.json with the machine, library versions and settings.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path

from tests.support.reference import reference_encode
from tuneflow.data.formats import load_conversations
from tuneflow.data.prepare import default_num_proc, encode_rows, usable_cores
from tuneflow.data.tokenize import prompt_and_reference
from tuneflow.modeling.demo import build_tokenizer

RESULTS = Path(__file__).with_name("results-prep.json")

# CHATML_TEMPLATE with TRL's {% generation %} marks around each answer and its end of turn, which is what
# tuneflow labels: TRL's assistant_only_loss then trains on the same tokens.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --- data --------------------------------------------------------------------------------------------------


class Synthetic:
    """English-like and Chinese-like text: Zipf-distributed words from made-up lexicons (Chinese words of one to
    four characters, themselves Zipf-distributed, written without spaces)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        onsets = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gr pl pr sh sl st str th tr wh".split()
        vowels = "a e i o u ai ea ee ie oa ou oo".split()
        codas = ["", "", "n", "r", "s", "t", "l", "d", "m", "nd", "ng", "st", "ck", "rt", "ll", "ss"]
        function_words = ("the of and to a in is that for it as with was on be by this are or from at an which have "
                          "not can will you your more we they their one all there when use each how").split()
        en, zh = set(), set()
        while len(en) < 8000:
            syllables = rng.choice((1, 1, 2, 2, 3))
            en.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas))
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 4000)]
        rng.shuffle(chars)
        while len(zh) < 10000:
            zh.add("".join(rng.choices(chars, cum_weights=self._zipf(len(chars)), k=rng.choice((1, 2, 2, 2, 3, 4)))))
        self.en, self.zh = function_words + self._shuffled(en), self._shuffled(zh)
        self.en_weights, self.zh_weights = self._zipf(len(self.en)), self._zipf(len(self.zh))

    def _shuffled(self, words: set[str]) -> list[str]:
        out = sorted(words)
        self.rng.shuffle(out)
        return out

    @staticmethod
    @functools.cache
    def _zipf(n: int) -> list[float]:
        return list(itertools.accumulate(1 / rank**1.05 for rank in range(1, n + 1)))

    def sentence(self, lang: str) -> str:
        rng = self.rng
        if lang == "en":
            words = rng.choices(self.en, cum_weights=self.en_weights, k=rng.randint(5, 24))
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), str(rng.randint(2, 2030)))
            if rng.random() < 0.3:
                words[rng.randrange(len(words) - 1)] += ","
            text = " ".join(words)
            return text[0].upper() + text[1:] + rng.choice(".....?!")
        parts = ["".join(rng.choices(self.zh, cum_weights=self.zh_weights, k=rng.randint(2, 7)))
                 for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.15:
            parts[-1] += rng.choice(("Python", "GPU", "API", f"{rng.randint(1, 2030)}年", f"{rng.randint(2, 99)}%"))
        return "，".join(parts) + rng.choice("。。。？！")

    def text(self, lang: str, units: float) -> str:
        """About ``units`` words (English) or characters (Chinese), in paragraphs, sometimes a numbered list."""
        rng, out, size, paragraph = self.rng, [], 0, []
        per_sentence = 14 if lang == "en" else 20
        while size < units:
            s = self.sentence(lang)
            paragraph.append(s)
            size += per_sentence
            if rng.random() < 0.25:
                out.append((" " if lang == "en" else "").join(paragraph))
                paragraph = []
        out.append((" " if lang == "en" else "").join(paragraph))
        if len(out) > 2 and rng.random() < 0.3:
            out = [out[0]] + [f"{i}. {p}" for i, p in enumerate(out[1:], 1)]
        return "\n\n".join(p for p in out if p)

    def row(self, lang: str) -> tuple[str, str, str]:
        """(instruction, input, output) of Alpaca-like lengths: a one-sentence instruction, an input one time in
        three, an answer of log-normal length (median ~85 words or ~160 characters, one in ten over ~250 or ~450)."""
        rng, scale = self.rng, (1 if lang == "en" else 1.5)
        instruction = self.sentence(lang)
        extra = self.text(lang, rng.randint(5, 40) * scale) if rng.random() < 0.3 else ""
        answer = self.text(lang, min(800, rng.lognormvariate(math.log(70), 0.8)) * scale)
        return instruction, extra, answer


def real_pool(folder: Path) -> dict[str, list[tuple[str, str, str]]]:
    """(instruction, input, output) of every Alpaca row in the folder's .json files, by language."""
    pool: dict[str, list] = {"en": [], "zh": []}
    for file in sorted(folder.glob("*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        for row in data if isinstance(data, list) else []:
            if isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
                text = row["instruction"] + row["output"]
                lang = "zh" if sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) / 10 else "en"
                pool[lang].append((row["instruction"], row.get("input") or "", row["output"]))
    if not pool["en"] or not pool["zh"]:
        raise SystemExit(f"{folder}: needs Alpaca .json files with both English and Chinese rows")
    return pool


def make_rows(n: int, seed: int, real_data: Path | None) -> list[dict]:
    """Alpaca rows, alternately English and Chinese; a quarter with 1-3 earlier turns, 30% with a system prompt."""
    rng = random.Random(seed)
    if real_data:
        pool = real_pool(real_data)
        draw = lambda lang: rng.choice(pool[lang])  # noqa: E731
    else:
        synthetic = Synthetic(rng)
        draw = synthetic.row
    systems = {
        "en": ["You are a helpful assistant.", "Answer concisely and accurately.", "You are an expert tutor."],
        "zh": ["你是一个乐于助人的助手。", "请简洁准确地回答。", "你是一位耐心的老师。"],
    }
    rows = []
    for i in range(n):
        lang = ("en", "zh")[i % 2]
        instruction, extra, output = draw(lang)
        row = {"instruction": instruction, "input": extra, "output": output}
        if rng.random() < 0.3:
            row["system"] = rng.choice(systems[lang])
        if rng.random() < 0.25:
            turns = [draw(lang) for _ in range(rng.randint(1, 3))]
            row["history"] = [[f"{ask}\n{context}" if context else ask, answer] for ask, context, answer in turns]
        rows.append(row)
    return rows


# --- the variants ------------------------------------------------------------------------------------------


def old_path(tokenizer, conversations, cutoff_len):
    """What tuneflow did before: each row rendered (three times per answer) and tokenized on its own."""
    from datasets import Dataset

    rows = []
    for messages in conversations:
        prompt, reference = prompt_and_reference(messages)
        rows.append({**reference_encode(tokenizer, messages, cutoff_len),
                     "prompt": json.dumps(prompt, ensure_ascii=False), "reference": reference})
    return Dataset.from_list(rows)


def trl_path(tokenizer, conversations, cutoff_len, num_proc):
    """TRL's SFTTrainer dataset preparation (chat template, assistant-only labels, truncation, dropping rows
    without labels), called without building a trainer around a model. Sets the tokenizer's template."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=cutoff_len, assistant_only_loss=True, dataset_num_proc=num_proc,
                         bf16=False, report_to=[])
        trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=None)
        return SFTTrainer._prepare_dataset(trainer, Dataset.from_dict({"messages": conversations}), tokenizer, args,
                                           packing=False, formatting_func=None, dataset_name="bench")


@contextmanager
def pinned_to_one_core():
    """Run on a single core: this thread pinned to it, and the tokenizer's thread pool (whose threads already
    exist, and so keep their own affinity) left unused."""
    cores, parallelism = os.sched_getaffinity(0), os.environ.get("TOKENIZERS_PARALLELISM")
    os.sched_setaffinity(0, {min(cores)})
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        if parallelism is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def versions() -> dict[str, str]:
    out = {}
    for name in ("datasets", "tokenizers", "transformers", "pyarrow", "jinja2", "trl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare_inputs(args, folder: Path) -> list[list[dict]]:
    """The validated conversations; the tokenizer trained on them is saved in ``folder``."""
    data_file = folder / "rows.json"
    data_file.write_text(json.dumps(make_rows(args.rows, args.seed, args.real_data), ensure_ascii=False),
                         encoding="utf-8")
    conversations = load_conversations(data_file, "alpaca")
    build_tokenizer([m["content"] for c in conversations for m in c], folder, vocab_size=args.vocab)
    return conversations


def variants(conversations, cutoff_len, notes: list[str]) -> dict:
    """name -> (context to run it in, function of a tokenizer returning the encoded dataset)."""
    cores = usable_cores()
    out = {
        "old per-row path (1 core)": (pinned_to_one_core, lambda tok: old_path(tok, conversations, cutoff_len)),
        "batched, num_proc=1 (1 core)": (
            pinned_to_one_core, lambda tok: encode_rows(tok, conversations, cutoff_len, 1)),
        f"batched, num_proc=1 (tokenizer threads on {cores} cores)": (
            nullcontext, lambda tok: encode_rows(tok, conversations, cutoff_len, 1)),
        f"batched, num_proc={default_num_proc(len(conversations))} (default)": (
            nullcontext, lambda tok: encode_rows(tok, conversations, cutoff_len)),
    }
    notes.append("TRL: a ChatML template with {% generation %} marks (assistant_only_loss); TRL drops rows left "
                 "without labels, so its row count can differ")
    for num_proc in (1, cores):
        out[f"TRL SFTTrainer prep, dataset_num_proc={num_proc}"] = (
            nullcontext, lambda tok, n=num_proc: trl_path(tok, conversations, cutoff_len, n if n > 1 else None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-data", type=Path, help="draw rows from the Alpaca .json files in this folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    tokenizer_dir = tempfile.TemporaryDirectory()
    conversations = prepare_inputs(args, Path(tokenizer_dir.name))
    n = len(conversations)
    print(f"{n} rows and a {args.vocab}-token BPE ready in {time.perf_counter() - started:.0f} s")
    notes: list[str] = []
    runs = variants(conversations, args.cutoff_len, notes)

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for repeat in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every variant
        for name, (context, run) in runs.items():
            # A freshly loaded tokenizer each time, as build() has: a used one has its word cache filled.
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir.name)
            with context():
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                outputs[name] = run(tokenizer)
                seconds[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - cpu0)
            print(f"  run {repeat + 1}/{args.repeats}  {name}: {n / seconds[name][-1]:,.0f} rows/s")

    old = outputs["old per-row path (1 core)"]
    same = {name: out["input_ids"] == old["input_ids"] and out["labels"] == old["labels"]
            and (name.startswith("TRL") or out["prompt"] == old["prompt"]) for name, out in outputs.items()}
    if not all(ok for name, ok in same.items() if not name.startswith("TRL")):
        raise SystemExit("the batched path's output differs from the per-row path's")
    baseline = n / min(seconds["old per-row path (1 core)"])
    results = []
    print(f"\n{'variant':<52} {'rows/s':>8} {'median':>8} {'speed-up':>9} {'rows/CPU-s':>11}  same ids+labels")
    for name, times in seconds.items():
        best, median, per_cpu = n / min(times), n / statistics.median(times), n / min(cpu[name])
        results.append({"variant": name, "rows_per_s": round(best), "rows_per_s_median": round(median),
                        "speedup": round(best / baseline, 2), "rows_per_cpu_s": round(per_cpu),
                        "seconds": [round(t, 3) for t in times], "cpu_seconds": [round(t, 3) for t in cpu[name]],
                        "rows_out": len(outputs[name]), "identical_ids_and_labels": same[name]})
        print(f"{name:<52} {best:>8,.0f} {median:>8,.0f} {best / baseline:>8.2f}x {per_cpu:>11,.0f}  "
              f"{'yes' if same[name] else 'no'}")
    lengths = old["full_length"]
    report = {
        "machine": {"usable_cores": usable_cores(), "cpu": cpu_model(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "versions": versions(),
        "settings": {"rows": n, "seed": args.seed, "vocab": len(tokenizer), "cutoff_len": args.cutoff_len,
                     "repeats": args.repeats, "map_batch_size": 1000,
                     "data": f"Alpaca rows from {args.real_data}" if args.real_data else "synthetic zh/en",
                     "tokens_per_row_mean": round(sum(lengths) / n, 1),
                     "rows_over_cutoff": sum(length > args.cutoff_len for length in lengths),
                     "answers_per_row_mean": round(sum(m["role"] == "assistant" for c in conversations for m in c) / n,
                                                   2)},
        "results": results,
        "notes": notes,
    }
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    tokenizer_dir.cleanup()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
