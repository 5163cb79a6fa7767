//! Compares `realign::model::expf::exp_slice` with the C library's `expf` (`f32::exp`) on all
//! 2^32 f32 bit patterns (development aid; ~30 s on one core). Prints how many differ.
fn main() {
    const CHUNK: u64 = 1 << 20;
    let (mut differ, mut first) = (0u64, None);
    let mut xs = vec![0f32; CHUNK as usize];
    let mut ys = vec![0f32; CHUNK as usize];
    for c in 0..(1u64 << 32) / CHUNK {
        for (i, x) in xs.iter_mut().enumerate() {
            *x = f32::from_bits((c * CHUNK + i as u64) as u32);
        }
        realign::model::expf::exp_slice(&xs, &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let want = x.exp();
            if want.to_bits() != y.to_bits() && !(want.is_nan() && y.is_nan()) {
                differ += 1;
                first.get_or_insert(*x);
            }
        }
    }
    println!(
        "vector path available: {}; inputs that differ from expf: {differ} of 2^32 (first: {first:?})",
        realign::model::expf::available()
    );
}
