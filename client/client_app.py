"""The data owner's Flower ClientApp (Message API): receive a release, verify, store, score.

A SuperNode started by `free-client join` runs this ClientApp, from the
installed package, for the aggregator's ``evaluate`` message of each meta
round (`free_common.flower_app.release_content`). For each message it

1. reads the signed release manifest and the weights (data only: canonical
   JSON and a byte vector, never code);
2. checks the server's signature against the pinned ``--server-pub`` and the
   weights' size and sha256 against the signed manifest, then stores them as
   ``RELEASES/<version>/meta.safetensors`` and ``manifest.json``
   (`free_common.security.release_dir.save_release`); a release that fails either check
   is refused and nothing is written;
3. with ``--data``, fine-tunes the release on local few-shot episodes
   (`free_client.local_tasks`) and replies with the accuracy.

The reply's ``"metrics"`` record holds ``version``, ``stored`` and, with data,
``accuracy``, ``ci95`` and ``episodes``. Only these numbers leave the owner.
A refused release makes the handler raise, so the aggregator sees an error
reply for this node. Settings come from the node config (`JoinSettings`),
never from the aggregator's run config.
"""

from __future__ import annotations

import logging
import sys

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from free_client.local_tasks import load_class_folders, score_release
from free_client.node_settings import JoinSettings
from free_common.engine.release_model import release_architecture
from free_common.errors import ConfigError, DataError, FreeError
from free_common.flower_app import METRICS_RECORD, read_release_content
from free_common.security.keys import load_public_key
from free_common.security.release_dir import WEIGHTS_NAME, save_release

__all__ = ["app", "receive_release"]

log = logging.getLogger("free_client.client_app")


def receive_release(content: RecordDict, settings: JoinSettings) -> dict[str, float]:
    """Verify and store a pushed release; score it on local data when there is some.

    Returns
    -------
    dict
        The metrics to reply with.

    Raises
    ------
    WireError
        The message holds no well-formed release.
    SignatureError
        The release is not signed by the pinned server key.
    PayloadMismatch
        The weights differ from the signed manifest.
    """
    signed, weights = read_release_content(content)
    pinned = load_public_key(settings.server_pub)
    folder = settings.releases_dir / str(signed.record.version)
    release = save_release(signed, [weights], folder, pinned)
    log.info(
        "stored release %d (%s, %d bytes) in %s",
        release.version,
        release.architecture,
        release.payload_size,
        folder,
    )
    metrics: dict[str, float] = {"version": float(release.version), "stored": 1.0}
    if settings.data_dir is None:
        return metrics
    try:
        architecture = release_architecture(release)
        data = load_class_folders(
            settings.data_dir, int(architecture["channels"]), int(architecture["image_size"])
        )
        score = score_release(
            folder / WEIGHTS_NAME,
            architecture,
            data,
            shots=settings.shots,
            queries=settings.queries,
            episodes=settings.episodes,
            steps=settings.steps,
            lr=settings.lr,
            seed=settings.seed,
        )
    except (ConfigError, DataError, KeyError, ValueError) as exc:
        # The release is stored; only the local score is missing, and the owner is told why.
        log.error("release %d was stored but not fine-tuned: %s", release.version, exc)
        return metrics
    log.info(
        "release %d: %d-way %d-shot accuracy %.3f +- %.3f over %d local episodes",
        release.version,
        score.ways,
        score.shots,
        score.accuracy,
        score.ci95,
        score.episodes,
    )
    metrics.update(accuracy=score.accuracy, ci95=score.ci95, episodes=float(score.episodes))
    return metrics


app = ClientApp()


def evaluate(message: Message, context: Context) -> Message:
    """Handle the aggregator's push of a release (see the module docstring)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower call otherwise
    settings = JoinSettings.from_node_config(context.node_config)
    try:
        metrics = receive_release(message.content, settings)
    except FreeError as exc:
        log.error("refused the pushed release: %s", exc.message)
        raise
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=message)


# Registered by call, not as a decorator: flwr ships no type information.
app.evaluate()(evaluate)
