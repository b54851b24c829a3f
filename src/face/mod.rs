//! The face path: frames → detection → alignment → embedding → 1:N match → a verdict over
//! several frames. Pure stages (`detect`, `align`, `matcher`, `quality`, `track`, `liveness`)
//! do no I/O; [`engine`] holds the ONNX sessions. The face thread that runs them at the gate is
//! the face stage, `daemon::stages::face`.

pub mod align;
pub mod camera;
pub mod detect;
pub mod engine;
pub mod enrol;
pub mod eval;
pub mod image;
pub mod liveness;
pub mod matcher;
#[cfg(feature = "opencv")]
pub mod ocv;
pub mod quality;
pub mod source;
pub mod tools;
pub mod track;
pub mod v4l2;
