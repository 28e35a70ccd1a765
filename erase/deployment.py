"""`erase serve`: a Ray Serve deployment that generates with the masks behind registry aliases.

    erase serve --mask models:/erase-toy-striped@production --port 8000
    curl -s localhost:8000/ -d '{"prompt": "a striped red cross", "seed": 0}'

Each replica loads the model once and folds in the masks the aliases point to (the same checks
as everywhere: sha256 against the one recorded at logging, fingerprint against the model). A
thread checks the aliases every `poll_seconds`; when one moved, the new versions are fetched
and checked first, and only then swapped in: the touched weights are restored from a copy kept
at start-up and the new masks folded, under the lock every generation holds, so a request is
answered by one set of masks, old or new, and none is dropped. A fetched mask that fails its
check is refused: at start-up the replica does not start; later it keeps the last good masks
and says so (in its log and in every response's `warning`).

`MaskedModel` is the plain-Python part (no Ray), `MaskedGeneration` the Serve deployment.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time

import torch

from erase.registry import load_masks, resolve_version
from erase.tracking import connect

log = logging.getLogger("erase.serve")


class MaskedModel:
    """A generator with the masks behind `aliases` folded in, swappable while it serves."""

    def __init__(self, model: str, aliases: list[str], *, tracking_uri: str | None = None,
                 model_path: str | None = None, device: str = "cpu"):
        from erase.pipelines import load_generator

        connect(tracking_uri, existing=True)
        self.model, self.aliases = model, list(aliases)
        self.gen = load_generator(model, model_path, device=device)
        self.sites = self.gen.mask_sites()
        self.pristine = self._touched_weights()
        self.lock = threading.Lock()
        self.versions: list[str] = []
        self.applied: list[dict] = []
        self.warning: str | None = None
        self.refused: list[str] | None = None  # the versions whose masks failed their checks
        self.refresh()  # a mask that fails its check here stops the start

    def _touched_weights(self) -> dict[str, torch.Tensor]:
        """A copy of every weight and bias a mask can zero, to unfold with (on the CPU, not the GPU)."""
        modules = dict(self.gen.transformer.named_modules())
        kept = {}
        for site in self.sites:
            for tap in site.taps:
                for name, tensor in modules[tap.module].named_parameters():
                    kept[f"{tap.module}.{name}"] = tensor.detach().to("cpu", copy=True)
        return kept

    def wanted(self) -> list[str]:
        """The versions the aliases point to now, as models:/NAME/VERSION."""
        return [f"models:/{v.name}/{v.version}" for v in map(resolve_version, self.aliases)]

    def refresh(self) -> bool:
        """Swap in the versions the aliases point to, if they moved; True if it swapped. A version that
        fails its checks raises before anything changes."""
        versions = self.wanted()
        if versions in (self.versions, self.refused):  # a refused version is not fetched again every poll
            return False
        try:
            sites, combined, applied = load_masks(versions, self.sites, self.model)  # fetched and checked first
        except Exception:
            self.refused = versions
            raise
        from erase.masks import fold_into_weights

        parameters = dict(self.gen.transformer.named_parameters())
        with self.lock, torch.no_grad():
            for name, original in self.pristine.items():
                parameters[name].copy_(original)
            fold_into_weights(self.gen.transformer, sites, combined)
            self.versions, self.applied, self.warning = versions, applied, None
        log.warning("erase serve: now generating with %s", ", ".join(versions))
        return True

    def poll(self, seconds: float, stop: threading.Event) -> None:
        """Refresh every `seconds` until `stop`; a failed refresh keeps the last good masks and says so."""
        while not stop.wait(seconds):
            try:
                self.refresh()
            except Exception as err:  # the registry or a mask failed: keep serving what passed its checks
                self.warning = f"kept {', '.join(self.versions)}: {err}"
                log.warning("erase serve: %s", self.warning)

    def generate(self, prompt: str, seed: int = 0, steps: int | None = None) -> dict:
        """One image as a base64 PNG, with the versions that made it."""
        from PIL import Image

        from erase.detectors import to_uint8
        from erase.evaluate import generate

        with self.lock:
            image = to_uint8(generate(self.gen, [prompt], [seed], steps))[0]
            versions, warning = list(self.versions), self.warning
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        return {"image_png": base64.b64encode(png.getvalue()).decode(), "versions": versions, "warning": warning}


def application(model: str, aliases: list[str], *, tracking_uri: str, poll_seconds: float = 30.0,
                model_path: str | None = None, device: str = "cpu", num_gpus: float = 0.0):
    """The Serve application: one MaskedGeneration replica (on a GPU with `num_gpus`). `tracking_uri` and
    `model_path` must hold for the replica's process: absolute paths, or a server's URL."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_gpus": num_gpus}, max_ongoing_requests=8)
    class MaskedGeneration:
        def __init__(self):
            self.masked = MaskedModel(model, aliases, tracking_uri=tracking_uri, model_path=model_path, device=device)
            self.stop = threading.Event()
            threading.Thread(target=self.masked.poll, args=(poll_seconds, self.stop), daemon=True).start()

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            started = time.perf_counter()
            # in a thread: the replica's event loop keeps answering health checks while a FLUX image renders
            answer = await asyncio.to_thread(self.masked.generate, str(body["prompt"]), int(body.get("seed", 0)),
                                             body.get("steps"))
            return {**answer, "seconds": round(time.perf_counter() - started, 3)}

        def __del__(self):
            self.stop.set()

    return MaskedGeneration.bind()
