"""Errors raised when reading or writing a delta artifact."""


class ArtifactError(ValueError):
    """The artifact cannot be used; the message says what to fix."""


class CorruptArtifactError(ArtifactError):
    """A shard or file is missing, truncated or does not match its sha256 in the manifest."""


class BaseMismatchError(ArtifactError):
    """The delta was made against a different base model than the one it is applied to."""

    def __init__(self, artifact_identity: str, base_identity: str, base_dir: str) -> None:
        super().__init__(
            f"delta was made against base {artifact_identity}, but {base_dir} is base {base_identity}; "
            "apply it to the base it was compressed against (or recompress the fine-tune against this base)"
        )
        self.artifact_identity = artifact_identity
        self.base_identity = base_identity
