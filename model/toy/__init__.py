"""The ``toy`` world: procedural ball clips where memory guidance is real and measurable on a CPU.

* :mod:`model.toy.world` renders the clips and names them;
* :mod:`model.toy.classify` tells motion and colour back from pixels;
* :mod:`model.toy.components` builds the preset's pipeline components from the shipped weights;
* :mod:`model.toy.backbone` trains the Wan transformer on the world (the encoder is trained by
  :mod:`model.training`, like on any bank);
* :mod:`model.toy.evaluate` measures how far memory steers the generated motion.
"""
