//! Camera frame ingest: arbitrary bytes as a JPEG/PNG file or a YUYV buffer, through decoding to
//! the detector's letterboxed input. A clear error or a well-formed image, never a panic, and no
//! allocation beyond the decoder's limits (a PNG claiming 60000x60000 is refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use menshen::face::detect::letterbox;
use menshen::face::source::RawFrame;

fuzz_target!(|data: &[u8]| {
    let frames = [
        RawFrame::Jpeg(data.to_vec()),
        RawFrame::Yuyv {
            width: u32::from(data.first().copied().unwrap_or(0)) * 2,
            height: u32::from(data.get(1).copied().unwrap_or(0)),
            data: data.get(2..).unwrap_or_default().to_vec(),
        },
    ];
    for f in frames {
        if let Ok(img) = f.decode() {
            assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3);
            let lb = letterbox(img.width, img.height, 320);
            assert!(lb.resized.0 <= lb.input.0 && lb.resized.1 <= lb.input.1);
            let small = img.resize(lb.resized.0, lb.resized.1);
            assert_eq!(small.data.len(), lb.resized.0 as usize * lb.resized.1 as usize * 3);
        }
    }
});
