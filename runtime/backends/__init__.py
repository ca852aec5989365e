"""The engines themselves, one sub-package per runtime: ``llama_cpp/`` runs the GGUF talker and code predictor;
``onnxruntime/`` runs the streaming ONNX decoder, the voice encoders' graphs and the ONNX talker + fused
predictor (CPU, CUDA or TensorRT execution providers). The official PyTorch modules
(``export/torch_reference.py``) implement the same contract as the parity reference.

The contract they implement is ``runtime/engine/contract.py``; which engine loads which bundle component is
the table in ``runtime/engine/specs.py``. A new engine (say TensorRT) is one sub-package here, one row there,
one export stage, and ``tests/test_engine_contract.py`` passing for it.
"""

from __future__ import annotations

from ..engine.config import TALKER_CONTEXT
from ..engine.contract import GenerationEngines, Placement, StepOutput

__all__ = ["TALKER_CONTEXT", "GenerationEngines", "Placement", "StepOutput"]
