"""CLIP pretraining on open_clip's trainer (open_clip_train): the embedded default's tiny
CLIP (`tiny_clip`), and Eslami & de Melo's SharedCLIP (`sharedclip`) with the
AlignCLIP-IMSep loss (`imsep_loss`, `imsep`: entry point; `sentences`: caption embeddings)."""
