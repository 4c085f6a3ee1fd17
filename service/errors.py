"""The service's domain errors.

    AnoscopeError
    ├── InputError                  the caller sent something unusable (HTTP 4xx)
    │   ├── InvalidImageError       not an image, truncated, unsupported mode        -> 422
    │   ├── UnsupportedMediaTypeError  a body that is neither multipart nor an image    -> 415
    │   ├── ImageTooLargeError      pixel count over the limit (checked before decoding) -> 413
    │   ├── PayloadTooLargeError    request body over the limit                       -> 413
    │   ├── TooManyFilesError       more files in one request than allowed            -> 413
    │   ├── InvalidModelNameError   a model name with path characters                 -> 400
    │   └── AuthenticationError     API keys are configured and none valid was sent   -> 401
    ├── ModelNotFoundError          no such model                                     -> 404
    ├── ModelNotReadyError          model still loading / failed to load              -> 503
    ├── OverloadedError             inference queue full                              -> 503 + Retry-After
    ├── InferenceTimeoutError       the engine did not answer within the timeout        -> 503
    ├── ReloadFailedError           a reload found a broken bundle; the old one serves -> 409
    ├── InferenceError              ONNX Runtime failed on a valid input              -> 500
    └── BundleError                 a bundle directory is missing, broken or incompatible
        └── BundleSchemaError       model.json does not match the schema this version reads

Below the HTTP layer, code raises these; `service/app/problems.py` maps them to RFC 9457
problem-details responses in one place.
"""

from __future__ import annotations


class AnoscopeError(Exception):
    """Base of every error anoscope raises on purpose."""

    status_code = 500
    title = "Internal error"


class InputError(AnoscopeError):
    status_code = 400
    title = "Bad request"


class InvalidImageError(InputError):
    status_code = 422
    title = "Invalid image"


class UnsupportedMediaTypeError(InputError):
    status_code = 415
    title = "Unsupported media type"


class ImageTooLargeError(InputError):
    status_code = 413
    title = "Image too large"


class PayloadTooLargeError(InputError):
    status_code = 413
    title = "Payload too large"


class TooManyFilesError(InputError):
    status_code = 413
    title = "Too many files"


class InvalidModelNameError(InputError):
    status_code = 400
    title = "Invalid model name"


class AuthenticationError(InputError):
    status_code = 401
    title = "Unauthorized"


class ModelNotFoundError(AnoscopeError):
    status_code = 404
    title = "Model not found"


class ModelNotReadyError(AnoscopeError):
    status_code = 503
    title = "Model not ready"


class OverloadedError(AnoscopeError):
    status_code = 503
    title = "Service overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(AnoscopeError):
    status_code = 503
    title = "Inference timed out"


class ReloadFailedError(AnoscopeError):
    status_code = 409
    title = "Reload failed"

    def __init__(self, message: str, *, model: str, serving_version: str | None) -> None:
        super().__init__(message)
        self.model = model
        self.serving_version = serving_version  # the version still answering, if any


class InferenceError(AnoscopeError):
    status_code = 500
    title = "Inference failed"


class BundleError(AnoscopeError):
    status_code = 500
    title = "Bundle error"


class BundleSchemaError(BundleError):
    title = "Incompatible bundle"
