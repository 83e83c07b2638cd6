//! Maps each core error kind to its exception class in `exo.errors`, in one place.

use pyo3::PyErr;

use crate::error::Error;

pyo3::import_exception!(exo.errors, InvalidTensorError);
pyo3::import_exception!(exo.errors, InvalidShardError);
pyo3::import_exception!(exo.errors, InvalidArgumentError);
pyo3::import_exception!(exo.errors, InvalidModelError);
pyo3::import_exception!(exo.errors, ContextOverflowError);
pyo3::import_exception!(exo.errors, CacheEvictedError);
pyo3::import_exception!(exo.errors, InsufficientMemoryError);
pyo3::import_exception!(exo.errors, BackendError);
pyo3::import_exception!(exo.errors, PeerError);
pyo3::import_exception!(exo.errors, RequestFailedError);
pyo3::import_exception!(exo.errors, RequestStalledError);
pyo3::import_exception!(exo.errors, StandInError);
pyo3::import_exception!(exo.errors, ConfigNotFoundError);
pyo3::import_exception!(exo.errors, InvalidConfigError);
pyo3::import_exception!(exo.errors, DiscoveryError);
pyo3::import_exception!(exo.errors, DownloadError);
pyo3::import_exception!(exo.errors, ModelNotFoundError);
pyo3::import_exception!(exo.errors, UnauthorizedError);
pyo3::import_exception!(exo.errors, HubConnectionError);
pyo3::import_exception!(exo.errors, IntegrityError);
pyo3::import_exception!(exo.errors, OfflineError);
pyo3::import_exception!(exo.errors, InferenceServerError);

impl From<Error> for PyErr {
    fn from(error: Error) -> Self {
        PyErr::from(&error)
    }
}

impl From<&Error> for PyErr {
    fn from(error: &Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidTensor(_) => InvalidTensorError::new_err(message),
            Error::InvalidShard(_) => InvalidShardError::new_err(message),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(message),
            Error::InvalidModel(_) => InvalidModelError::new_err(message),
            Error::ContextOverflow(_) => ContextOverflowError::new_err(message),
            Error::CacheEvicted(_) => CacheEvictedError::new_err(message),
            Error::InsufficientMemory(_) => InsufficientMemoryError::new_err(message),
            Error::NotFound(_) => ModelNotFoundError::new_err(message),
            Error::Unauthorized(_) => UnauthorizedError::new_err(message),
            Error::Connection(_) => HubConnectionError::new_err(message),
            Error::Integrity(_) => IntegrityError::new_err(message),
            Error::Offline(_) => OfflineError::new_err(message),
            Error::Download(_) => DownloadError::new_err(message),
            Error::Backend(_) => BackendError::new_err(message),
            Error::InferenceServer(_) => InferenceServerError::new_err(message),
            Error::Peer(_) => PeerError::new_err(message),
            Error::RequestFailed(_) => RequestFailedError::new_err(message),
            Error::Stalled(_) => RequestStalledError::new_err(message),
            Error::StandIn(_) => StandInError::new_err(message),
            Error::ConfigNotFound(_) => ConfigNotFoundError::new_err(message),
            Error::InvalidConfig(_) => InvalidConfigError::new_err(message),
            Error::Discovery(_) => DiscoveryError::new_err(message),
        }
    }
}
