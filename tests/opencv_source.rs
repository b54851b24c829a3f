#![cfg(feature = "opencv")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The OpenCV `VideoCapture` source (cargo feature `opencv`): a short MJPEG video made at test time
//! from the smoke images is read back frame by frame, every frame holds a face the Rust pipeline
//! finds, and the end of the video is "gone" (a live stream would be reopened).

use std::path::{Path, PathBuf};
use std::time::Duration;

use menshen::config::FaceConfig;
use menshen::face::detect::primary;
use menshen::face::engine::DetectorOptions;
use menshen::face::ocv::OpenCvSource;
use menshen::face::source::{FrameSource, SourceError};
use menshen::face::tools;
use opencv::core::{Mat, Size};
use opencv::prelude::*;
use opencv::{imgcodecs, imgproc, videoio};

fn smoke() -> PathBuf {
    tools::locate(&FaceConfig::default()).models_dir.join("../data/smoke")
}

fn make_video(path: &Path, images: &[&str], repeat: usize) -> usize {
    let fourcc = videoio::VideoWriter::fourcc('M', 'J', 'P', 'G').unwrap();
    let mut w = videoio::VideoWriter::new(path.to_str().unwrap(), fourcc, 10.0, Size::new(640, 480), true).unwrap();
    assert!(w.is_opened().unwrap(), "OpenCV cannot write MJPEG AVI");
    let mut n = 0;
    for name in images {
        let img = imgcodecs::imread(smoke().join(name).to_str().unwrap(), imgcodecs::IMREAD_COLOR).unwrap();
        assert!(!img.empty(), "{name}");
        let mut frame = Mat::default();
        imgproc::resize(&img, &mut frame, Size::new(640, 480), 0.0, 0.0, imgproc::INTER_LINEAR).unwrap();
        for _ in 0..repeat {
            w.write(&frame).unwrap();
            n += 1;
        }
    }
    w.release().unwrap();
    n
}

#[test]
fn a_video_file_plays_through_the_face_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("smoke.avi");
    let written = make_video(&video, &["George_W_Bush_0001.jpg", "astronaut.png"], 3);
    let mut src = OpenCvSource::open(video.to_str().unwrap()).unwrap();
    let cfg = tools::locate(&FaceConfig::default());
    let mut eng = tools::engine(&cfg, DetectorOptions::default()).unwrap();
    let mut read = 0;
    loop {
        match src.next(Duration::from_secs(2)) {
            Ok(raw) => {
                let frame = raw.decode().unwrap();
                assert_eq!((frame.width, frame.height), (640, 480));
                let faces = eng.detect(&frame).unwrap();
                assert!(primary(&faces, frame.width, frame.height).is_some(), "frame {read}: no face");
                read += 1;
            }
            Err(SourceError::Gone(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(read, written, "every frame read back");
    // A live source is reopened after it ends; a file starts again.
    src.reopen().unwrap();
    assert!(src.next(Duration::from_secs(2)).is_ok());
}
