"""Retraining against the MLflow Model Registry: skip what was already trained, score challenger against champion on
one frozen evaluation set, and move the aliases.

A registered version carries the fingerprint of what it was trained from: the base model's commit, the dataset's
commit (or a local path's content digest) and the config hash (`tuneflow.core.params.config_hash`). A retrain whose
fingerprint a version already carries is skipped. Otherwise the pipeline runs, and its export is scored, with the
current champion and the base model, on the frozen evaluation set: rows drawn once from the held-out split of the
first retrain of the name, stored as an MLflow artifact (by digest) and named by the registered model's
`tuneflow.eval_set` tag, so that every later decision compares on the same rows. Aliases only (`champion`,
`challenger`, `previous-champion`), never the deprecated stages; they move only once everything is scored.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuneflow.core.config import METRIC_DIRECTIONS, TuneflowConfig, tracking_uri
from tuneflow.core.errors import TuneflowError
from tuneflow.core.evaluation import PAIR_METRICS
from tuneflow.core.params import config_hash
from tuneflow.core.results import ArtifactRef, SourceRef

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
EVAL_SET_TAG = "tuneflow.eval_set"
EVAL_SET = "frozen-eval-set"  # artifact folder; its file:
EVAL_ROWS = "rows.jsonl"


class RegistryProblem(TuneflowError):
    """A retrain that cannot go ahead, worded for the user with what to change."""


@dataclass(frozen=True)
class Fingerprint:
    model: SourceRef
    datasets: tuple[SourceRef, ...]  # the training datasets, in config order
    eval_dataset: SourceRef | None
    config_hash: str

    def tags(self) -> dict[str, str]:
        tags = {"tuneflow.model_sha": self.model.revision,
                "tuneflow.dataset_sha": ",".join(ref.revision for ref in self.datasets),
                "tuneflow.config_hash": self.config_hash}
        if self.eval_dataset is not None:
            tags["tuneflow.eval_dataset_sha"] = self.eval_dataset.revision
        return tags

    def at(self, lineage: dict) -> "Fingerprint":
        """The same sources at the commits a run's summary.json lineage records: what the run trained from."""
        def moved(ref: SourceRef, revision: str) -> SourceRef:
            return ref.model_copy(update={"revision": revision})

        return Fingerprint(
            moved(self.model, lineage["model_revision"]),
            tuple(map(moved, self.datasets, lineage["dataset_revision"].split(","))),
            self.eval_dataset and moved(self.eval_dataset, lineage["eval_dataset_revision"]), self.config_hash)

    def describe(self) -> str:
        refs = [self.model, *self.datasets, *([self.eval_dataset] if self.eval_dataset else [])]
        return ", ".join(f"{ref.kind} {ref.name}@{ref.revision[:12]}" for ref in refs) + f", config {self.config_hash}"


@dataclass
class Decision:
    decision: str  # promoted | kept | skipped
    model_name: str
    version: int | None
    champion: int | None  # the champion's version after the decision
    metric: str
    scores: dict[str, float] = field(default_factory=dict)  # challenger, champion, base on the frozen set
    reason: str = ""
    guards: list[dict] = field(default_factory=list)  # registry.guards: metric, challenger, champion, limit, passed

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        rows = "\n".join(f"| {who} | {value:.4f} |" for who, value in self.scores.items())
        table = f"\n\n| model | {self.metric} |\n|---|---|\n{rows}" if rows else ""
        if self.guards:
            table += "\n\n| guard | challenger | champion | limit | holds |\n|---|---|---|---|---|\n" + "\n".join(
                f"| {g['metric']} | {_figure(g['challenger'])} | {_figure(g['champion'])} | {g['limit']} | "
                f"{'yes' if g['passed'] else 'no'} |" for g in self.guards)
        return (f"# {self.model_name}: {self.decision}\n\n{self.reason}\n\n"
                f"- version: {self.version}\n- champion: {self.champion}{table}\n")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def pinned_sources(cfg: TuneflowConfig, logger: logging.Logger) -> list[SourceRef]:
    """The base model and every dataset (cfg.all_sources) at their current commits (local paths: content digests);
    nothing large is downloaded."""
    from tuneflow.sources.hub import Problem, hub_token, local_revision, locate

    token, refs = hub_token(cfg), []
    for key, section in [("model", cfg.model), *cfg.all_sources]:
        kind = "model" if key == "model" else "dataset"
        src = locate(section.name_or_path, section.revision, kind, logger, token, tracking_uri(cfg.tracking.uri))
        if src.local is not None:
            refs.append(SourceRef(kind=kind, name=src.name, revision=local_revision(src.local),
                                  local_path=str(src.local)))
        elif src.sha:
            refs.append(SourceRef(kind=kind, name=src.name, revision=src.sha))
        else:
            raise Problem(f"{key} {src.name}: HF_HUB_OFFLINE is set, so its current commit cannot be known; a retrain "
                          "needs the Hub to tell whether anything changed")
    return refs


class Registry:
    """The registered model a retrain works on, in the MLflow Model Registry of the configured tracking store."""

    def __init__(self, cfg: TuneflowConfig):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if not cfg.registry.model_name:
            raise RegistryProblem("registry.model_name: a retrain registers its model under a name; set "
                                  "registry.model_name (e.g. --set registry.model_name=my-assistant)")
        if not cfg.export.enabled:
            raise RegistryProblem("export.enabled: a retrain registers the exported model; set export.enabled: true")
        self.cfg, self.name = cfg, cfg.registry.model_name
        self.uri = tracking_uri(cfg.tracking.uri)
        try:
            self.client = MlflowClient(self.uri, registry_uri=self.uri)
            self.client.search_registered_models(max_results=1)
        except MlflowException as exc:
            raise RegistryProblem(
                f"tracking.uri: the MLflow store at {self.uri} cannot serve a model registry "
                f"({str(exc).splitlines()[0][:200]}); use a database-backed store (sqlite:///mlflow.db) or an "
                "`mlflow server` whose --backend-store-uri is a database") from None

    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            return False
        return True

    def versions(self) -> list:
        return sorted(self.client.search_model_versions(f"name = '{self.name}'"), key=lambda v: int(v.version))

    def alias(self, alias: str):
        """The version an alias points to, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def trained_from(self, fp: Fingerprint):
        """The newest version trained from exactly this model, dataset and config, or None."""
        wanted = fp.tags()
        same = [v for v in self.versions() if all(v.tags.get(k) == value for k, value in wanted.items())]
        return same[-1] if same else None

    def skipped(self, version, fp: Fingerprint) -> Decision:
        champion = self.alias(CHAMPION)
        return Decision(
            "skipped", self.name, int(version.version), int(champion.version) if champion else None,
            self.cfg.registry.metric,
            reason=f"version {version.version} of {self.name} was trained from {fp.describe()}: nothing changed, "
                   "nothing to train")

    # The frozen evaluation set --------------------------------------------------------------------------------

    def eval_set_ref(self) -> ArtifactRef | None:
        if not self.exists():
            return None
        tag = self.client.get_registered_model(self.name).tags.get(EVAL_SET_TAG)
        return ArtifactRef.model_validate_json(tag) if tag else None

    def frozen_rows(self) -> list[dict] | None:
        """The frozen evaluation set's rows, or None when the name has none yet; a set that can no longer be read
        is an error (before anything trains), never silently replaced."""
        from tuneflow.tracking.artifacts import materialize

        ref = self.eval_set_ref()
        if ref is None:
            return None
        try:
            folder = materialize(ref, self.uri)
            rows = [json.loads(line) for line in (folder / EVAL_ROWS).read_text(encoding="utf-8").splitlines()]
        except Exception as exc:
            raise RegistryProblem(
                f"registry.model_name {self.name}: its frozen evaluation set ({ref.uri}, tag {EVAL_SET_TAG}) can no "
                f"longer be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); retrain "
                "with --refreeze-eval-set (flow parameter refreeze_eval_set) to draw a new one from this run's "
                "held-out split") from None
        r = self.cfg.registry
        paired = sorted({r.metric, *(g.metric for g in r.guards)} & set(PAIR_METRICS))
        if paired and not all("rejected" in row for row in rows):
            raise RegistryProblem(
                f"registry: {', '.join(paired)} is scored on preference pairs, and the frozen evaluation set of "
                f"{self.name} holds none (it was frozen from a run on instruction data); retrain with "
                "--refreeze-eval-set to draw one from this run's held-out pairs")
        return rows

    def freeze(self, run_id: str, rows: list[dict]) -> ArtifactRef:
        """Store ``rows`` as the frozen evaluation set (an artifact of ``run_id``)."""
        from tuneflow.tracking.artifacts import publish

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / EVAL_SET
            folder.mkdir()
            with open(folder / EVAL_ROWS, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            return publish(self.client, run_id, folder, EVAL_SET)

    # Registration and aliases ---------------------------------------------------------------------------------

    def register(self, model_id: str, run_id: str, tags: dict[str, str], eval_set: ArtifactRef) -> int:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name, description="Fine-tuned with tuneflow; `tuneflow retrain` registers every new export and "
                "moves the champion alias.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        self.client.set_registered_model_tag(self.name, EVAL_SET_TAG, eval_set.model_dump_json())
        version = self.client.create_model_version(self.name, f"models:/{model_id}", run_id=run_id, tags=tags,
                                                   model_id=model_id)
        return int(version.version)


def draw_eval_set(records: list[dict], n: int) -> list[dict]:
    """The first ``n`` held-out rows evaluate scored (its predictions, in the run's seeded order), as plain chat:
    prompt messages and reference answer (and a preference pair's rejected answer), so any model's own tokenizer
    and template can score them."""
    return [{k: r[k] for k in ("prompt", "reference", "rejected") if k in r} for r in records[:n]]


def score(model_dir: Path, rows: list[dict], cfg: TuneflowConfig,
          benchmarks=None) -> tuple[dict[str, float], list[str], tuple[list[float], list[float]] | None]:
    """Every held-out metric of the model in ``model_dir`` on ``rows``, with the generation settings of cfg.eval,
    and the scores of ``benchmarks`` (`tuneflow.sources.benchmarks.Prepared`, the guards' benchmarks) if given; its
    answers to ``rows``; and for preference pairs, its log-probabilities of the chosen and the rejected answers (what
    `tuneflow.modeling.metrics.preference` compares with the base's)."""
    import gc

    from tuneflow.data.prepare import encode_rows
    from tuneflow.modeling.benchmarks import score as score_benchmarks
    from tuneflow.modeling.load import DTYPES, device, load_pretrained, load_tokenizer
    from tuneflow.modeling.metrics import measure

    tokenizer = load_tokenizer(model_dir, cfg)
    model = load_pretrained(model_dir, cfg, DTYPES[cfg.export.dtype], {"": device()})
    conversations = [r["prompt"] + [{"role": "assistant", "content": r["reference"]}] for r in rows]
    encoded = encode_rows(tokenizer, conversations, cfg.prep.cutoff_len, num_proc=1)
    examples = [{"input_ids": i, "labels": lab} for i, lab in zip(encoded["input_ids"], encoded["labels"])]
    metrics, answers = measure(model, tokenizer, examples, [r["prompt"] for r in rows], [r["reference"] for r in rows],
                               cfg)
    metrics = {k: v for k, v in metrics.items() if k in METRIC_DIRECTIONS}
    if benchmarks is not None and benchmarks.benchmarks:
        metrics.update(score_benchmarks(model, tokenizer, benchmarks.benchmarks, benchmarks.task_dir,
                                        cfg.eval.batch_size)[0])
    logps = None
    if rows and "rejected" in rows[0]:
        from tuneflow.modeling.generation import answer_logps

        worse = encode_rows(tokenizer, [r["prompt"] + [{"role": "assistant", "content": r["rejected"]}] for r in rows],
                            cfg.prep.cutoff_len, num_proc=1)
        worse = [{"input_ids": i, "labels": lab} for i, lab in zip(worse["input_ids"], worse["labels"])]
        logps = (answer_logps(model, tokenizer, examples, cfg.eval.batch_size),
                 answer_logps(model, tokenizer, worse, cfg.eval.batch_size))
    del model
    gc.collect()
    return metrics, answers, logps


def decide(cfg: TuneflowConfig, challenger: dict[str, float], champion: dict[str, float] | None,
           base: dict[str, float]) -> tuple[bool, str, list[dict]]:
    """(promote?, why, the guards' results) from the scores on the frozen set: the challenger must win on
    registry.metric and keep every limit of registry.guards."""
    r = cfg.registry
    better = "greater" if r.maximize else "lower"
    mine, theirs, base_score = challenger[r.metric], champion[r.metric] if champion else None, base[r.metric]

    def gain(a: float, b: float) -> float:
        return a - b if r.maximize else b - a

    guards = check_guards(cfg, challenger, champion)
    if gain(mine, base_score) < 0:
        return False, (f"the challenger's {r.metric} {mine:.4f} is worse than the base model's {base_score:.4f} "
                       f"({better} is better)"), guards
    if theirs is None:
        promote, reason = True, (f"first version with a score: no champion to beat, and its {r.metric} {mine:.4f} is "
                                 f"not worse than the base model's {base_score:.4f}")
    elif gain(mine, theirs) > 0 and gain(mine, theirs) >= r.min_delta:
        promote, reason = True, (f"the challenger's {r.metric} {mine:.4f} beats the champion's {theirs:.4f} by "
                                 f"{gain(mine, theirs):.4f} (registry.min_delta {r.min_delta}; {better} is better)")
    else:
        return False, (f"the challenger's {r.metric} {mine:.4f} does not beat the champion's {theirs:.4f} by "
                       f"registry.min_delta {r.min_delta} ({better} is better)"), guards
    failed = [g for g in guards if not g["passed"]]
    if failed:
        return False, f"{reason}, but it fails " + "; ".join(g["why"] for g in failed), guards
    return promote, reason + ("; every guard holds" if guards else ""), guards


def check_guards(cfg: TuneflowConfig, challenger: dict[str, float], champion: dict[str, float] | None) -> list[dict]:
    """Each guard of registry.guards: {metric, challenger, champion, limit, passed, why}."""
    results = []
    for g in cfg.registry.guards:
        mine, theirs = challenger.get(g.metric), (champion or {}).get(g.metric)
        limits, why = [], []
        if g.max_drop is not None:
            limits.append(f"max_drop {g.max_drop:g}")
            if mine is not None and theirs is not None:
                drop = theirs - mine if g.maximize else mine - theirs
                if drop > g.max_drop + 1e-12:
                    why.append(f"the challenger's {mine:.4f} is {drop:.4f} {'below' if g.maximize else 'above'} the "
                               f"champion's {theirs:.4f}, more than max_drop {g.max_drop:g}")
        if g.min is not None:
            limits.append(f"min {g.min:g}")
            if mine is not None and mine < g.min:
                why.append(f"the challenger's {mine:.4f} is under min {g.min:g}")
        if g.max is not None:
            limits.append(f"max {g.max:g}")
            if mine is not None and mine > g.max:
                why.append(f"the challenger's {mine:.4f} is over max {g.max:g}")
        if mine is None:
            why.append("it was not scored for the challenger")
        results.append({"metric": g.metric, "challenger": mine, "champion": theirs, "limit": ", ".join(limits),
                        "passed": not why, "why": f"guard {g.metric}: " + "; ".join(why) if why else ""})
    return results


def fingerprint(cfg: TuneflowConfig, logger: logging.Logger) -> Fingerprint:
    model, *datasets = pinned_sources(cfg, logger)
    n = len(cfg.sources)
    return Fingerprint(model, tuple(datasets[:n]), datasets[n] if cfg.eval_dataset else None, config_hash(cfg))
