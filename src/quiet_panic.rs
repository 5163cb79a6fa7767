//! A panic inside a third-party reader, turned into an error. Some crates assert on damaged
//! input instead of returning an error (parquet's column reader does, on a page that needs a
//! dictionary the file lacks): a user's damaged file must give an error that names it, not a
//! crash, and not a "thread panicked" message before that error.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while [`catch`] runs on this thread: the panic hook stays silent.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

static HOOK: Once = Once::new();

/// Runs `f`; a panic inside it becomes `Err` with the panic's message, and is not printed.
/// Panics on other threads, and outside `f`, are printed as before (the hook installed on
/// first use hands them to the previous hook).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    use super::catch;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(catch(|| 7), Ok(7));
        let n = 3;
        assert_eq!(
            catch(|| -> u8 { panic!("offset {n} is negative") }),
            Err("offset 3 is negative".to_string())
        );
        assert_eq!(
            catch(|| -> u8 { panic!("static message") }),
            Err("static message".to_string())
        );
        // nested: the inner catch restores the outer quiet state
        assert_eq!(catch(|| catch(|| 1).map(|v| v + 1)), Ok(Ok(2)));
    }
}
