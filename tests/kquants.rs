//! Dequantisation of the GGUF block types that real judge and chat models ship in (Q8_0, Q5_0,
//! Q4_K, Q6_K; issue 16: the Qwen2.5 GGUF is Q4_K_M with Q5_0, Q8_0 and Q6_K tensors), checked
//! against blocks worked by hand from GGML's block layouts: each block is written into a small
//! GGUF file, read back through realign's GGUF reader, and dequantised.

use candle_core::Device;
use half::f16;

/// A GGUF v3 file with one 1-D tensor `t` of `n` values of GGML type `ggml_type`, its data the
/// raw `block` bytes.
fn gguf_with(ggml_type: u32, n: u64, block: &[u8]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata entries
    string(&mut b, "t");
    b.extend(1u32.to_le_bytes()); // dims
    b.extend(n.to_le_bytes());
    b.extend(ggml_type.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(block);
    b
}

/// Writes the block as a GGUF file and dequantises it through realign's reader.
fn dequantise(ggml_type: u32, n: u64, block: &[u8]) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.gguf");
    std::fs::write(&p, gguf_with(ggml_type, n, block)).unwrap();
    let content = realign::model::gguf::read_content(&p).unwrap();
    let mut f = std::fs::File::open(&p).unwrap();
    let q = content.tensor(&mut f, "t", &Device::Cpu).unwrap();
    q.dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q8_0_block_by_hand() {
    // d = 0.5; q_i = i - 16 (int8): x_i = 0.5 (i - 16)
    let mut block = h(0.5).to_vec();
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let y = dequantise(8, 32, &block);
    assert_eq!(y.len(), 32);
    assert_eq!(y[0], -8.0);
    assert_eq!(y[16], 0.0);
    assert_eq!(y[31], 7.5);
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.5 * (i as f32 - 16.0), "{i}");
    }
}

#[test]
fn q5_0_block_by_hand() {
    // d = 0.25. The 5-bit value of element j (0..16) is (qs[j] & 15) | bit j of qh << 4, of
    // element j + 16 it is (qs[j] >> 4) | bit (j + 16) of qh << 4; x = d (q - 16).
    // Choose q_j = j (low nibble j, high bit 0) and q_{j+16} = 31 - j (high nibble 15 - j,
    // high bit 1).
    let qh: u32 = 0xFFFF_0000;
    let mut block = h(0.25).to_vec();
    block.extend(qh.to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequantise(6, 32, &block);
    assert_eq!(y[0], -4.0); // q 0
    assert_eq!(y[15], -0.25); // q 15
    assert_eq!(y[16], 3.75); // q 31
    assert_eq!(y[31], 0.0); // q 16
    for j in 0..16 {
        assert_eq!(y[j], 0.25 * (j as f32 - 16.0), "{j}");
        assert_eq!(y[j + 16], 0.25 * (15.0 - j as f32), "{}", j + 16);
    }
}

#[test]
fn q4_k_block_by_hand() {
    // d = 1, dmin = 0.5. Sub-block k of 32 values has the 6-bit scale sc_k and min m_k:
    // for k < 4, sc_k = scales[k] & 63 and m_k = scales[k + 4] & 63; for k >= 4 the low four
    // bits sit in scales[k + 4] (scale low, min high nibble) and the top two in the top bits of
    // scales[k - 4] (scale) and scales[k] (min). x = d sc_k q - dmin m_k, with q the low
    // nibbles of a 32-byte group for the even sub-block and the high nibbles for the odd one.
    // Choose sc_k = k + 1, m_k = 2k, and every byte of qs = 0x53 (low nibble 3, high 5).
    let sc: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
    let m: [u8; 8] = [0, 2, 4, 6, 8, 10, 12, 14];
    let mut scales = [0u8; 12];
    scales[..4].copy_from_slice(&sc[..4]);
    scales[4..8].copy_from_slice(&m[..4]);
    for k in 4..8 {
        scales[k + 4] = (sc[k] & 15) | ((m[k] & 15) << 4);
        scales[k - 4] |= (sc[k] >> 4) << 6;
        scales[k] |= (m[k] >> 4) << 6;
    }
    let mut block = h(1.0).to_vec();
    block.extend(h(0.5));
    block.extend(scales);
    block.extend([0x53u8; 128]);
    let y = dequantise(12, 256, &block);
    assert_eq!(y.len(), 256);
    // sub-block 0: 1 * 1 * 3 - 0.5 * 0 = 3; sub-block 1: 1 * 2 * 5 - 0.5 * 2 = 9
    assert_eq!(y[0], 3.0);
    assert_eq!(y[32], 9.0);
    // sub-block 7: 8 * 5 - 0.5 * 14 = 33
    assert_eq!(y[255], 33.0);
    for (i, v) in y.iter().enumerate() {
        let k = i / 32;
        let q = if k % 2 == 0 { 3.0 } else { 5.0 };
        let want = sc[k] as f32 * q - 0.5 * m[k] as f32;
        assert_eq!(*v, want, "{i}");
    }
}

#[test]
fn q6_k_block_by_hand() {
    // Layout: ql[128] (low four bits), qh[64] (two high bits each), scales[16] (int8), d (f16).
    // In each half of 128 values, for l in 0..32: value l takes the low nibble of ql[l] and bits
    // 0-1 of qh[l]; l + 32 the low nibble of ql[l + 32] and bits 2-3; l + 64 the high nibble of
    // ql[l] and bits 4-5; l + 96 the high nibble of ql[l + 32] and bits 6-7; x = d * scale * (q -
    // 32), with scale = scales[8 h + l / 16 + 2 g] for group g (0..4) of half h.
    // Choose ql = 0x21 everywhere (low 1, high 2), qh = 0b11_10_01_00 (group g gets high bits g),
    // scales[s] = s - 8, d = 0.5.
    let mut block = vec![0x21u8; 128];
    block.extend([0b1110_0100u8; 64]);
    block.extend((0..16).map(|s| (s as i8 - 8) as u8));
    block.extend(h(0.5));
    let y = dequantise(14, 256, &block);
    assert_eq!(y.len(), 256);
    // value 0: half 0, group 0, q = 1 | 0 << 4 = 1, scale -8: 0.5 * -8 * (1 - 32) = 124
    assert_eq!(y[0], 124.0);
    // value 96 + 31 = 127: group 3, q = 2 | 3 << 4 = 50, scale index 1 + 6 = 7 -> -1:
    // 0.5 * -1 * 18 = -9
    assert_eq!(y[127], -9.0);
    for (i, v) in y.iter().enumerate() {
        let (half, r) = (i / 128, i % 128);
        let (g, l) = (r / 32, r % 32);
        let low = if g < 2 { 1 } else { 2 };
        let q = (low | (g << 4)) as f32 - 32.0;
        let scale = (8 * half + l / 16 + 2 * g) as f32 - 8.0;
        assert_eq!(*v, 0.5 * scale * q, "{i}");
    }
}
