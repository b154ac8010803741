"""Model core: DiT-Mem memory encoder, memory injection into Wan, generation pipeline."""

import logging as _logging


class _KnownImportNoise(_logging.Filter):
    """Drops two warnings that importing diffusers prints whenever torchao (the quantisation
    library, ``DITMEM_QUANTIZE``) is installed, though nothing is wrong: torch deprecating the
    way torchao registers two enums, and diffusers not finding tensor classes that torchao 0.18
    moved (used only to unpickle old torchao checkpoints, which ditmem never loads)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "is an Enum subclass and is now natively supported" in message
            or "Unable to import `torchao` Tensor objects" in message
        )


for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).addFilter(_KnownImportNoise())
