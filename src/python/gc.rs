//! Shows Python's garbage collector the Python objects that the core's stand-ins hold, so a
//! cycle through the core (a stand-in that refers back to its node or server) is collected.

use std::sync::{Arc, Mutex};

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::PyTraverseError;

/// A stand-in for a core object: it calls one Python object.
pub trait HoldsPython: Send + Sync {
    /// The Python object it calls.
    fn python_object(&self) -> &Py<PyAny>;
}

/// A core object made from a Python one: the core's handle, and the stand-in behind it when
/// the Python object was not a native one.
pub struct FromPy<T: ?Sized> {
    /// What the core uses.
    pub core: Arc<T>,
    /// The same object as a stand-in, for the collector to see; `None` for native objects.
    pub stand_in: Option<Arc<dyn HoldsPython>>,
}

impl<T: ?Sized> FromPy<T> {
    /// A native core object: nothing for the collector.
    pub fn native(core: Arc<T>) -> Self {
        Self { core, stand_in: None }
    }
}

/// The stand-ins a Python class owns, by role, reported to the collector by its
/// `__traverse__` and dropped by its `__clear__`.
#[derive(Default)]
pub struct StandIns(Mutex<Vec<(&'static str, Arc<dyn HoldsPython>)>>);

impl StandIns {
    /// Keeps `stand_in` (if any) as the one for `role`, replacing the one before.
    pub fn set(&self, role: &'static str, stand_in: Option<Arc<dyn HoldsPython>>) {
        if let Ok(mut held) = self.0.lock() {
            held.retain(|(r, _)| *r != role);
            held.extend(stand_in.map(|s| (role, s)));
        }
    }

    /// Reports every held stand-in's Python object (for `__traverse__`).
    pub fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Ok(held) = self.0.lock() {
            for (_, stand_in) in held.iter() {
                visit.call(stand_in.python_object())?;
            }
        }
        Ok(())
    }

    /// Drops every held stand-in (for `__clear__`).
    pub fn clear(&self) {
        if let Ok(mut held) = self.0.lock() {
            held.clear();
        }
    }
}
