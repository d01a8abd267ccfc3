#' Threads, SIMD level and build of the core
#'
#' `cbn_set_threads(n)` sets the number of OpenMP threads later calls use
#' (`n <= 0` restores the default: `OMP_NUM_THREADS` or the core count).
#' `cbn_set_isa(name)` picks the SIMD kernels (`"scalar"`, `"avx2"`,
#' `"avx512"`, or `""` for the best this CPU has). `cbn_config()` reports the
#' core's version, SIMD level, thread count and compiler.
#'
#' Forked children (e.g. [parallel::mclapply()]) run the core on one thread:
#' OpenMP's thread pool does not survive `fork()`.
#'
#' @param n Number of threads.
#' @param name SIMD level name.
#' @return `cbn_set_threads()`: the thread count now in use; `cbn_set_isa()`:
#'   the level now in use; `cbn_config()`: a list.
#' @examples
#' cbn_config()$isa
#' old <- cbn_config()$threads
#' cbn_set_threads(1)
#' cbn_set_threads(0)
#' @export
cbn_set_threads <- function(n) {
  if (!is.numeric(n) || length(n) != 1L || is.na(n) || n != trunc(n) || abs(n) > .Machine$integer.max) {
    stop(sprintf("`n` must be one whole number; received %s", deparse1(n)), call. = FALSE)
  }
  .Call(cbn_set_threads_c, as.integer(n))
}

#' @rdname cbn_set_threads
#' @export
cbn_set_isa <- function(name) {
  if (!is.character(name) || length(name) != 1L || is.na(name)) {
    stop(sprintf("`name` must be one string (\"scalar\", \"avx2\", \"avx512\" or \"\"); received %s",
                 deparse1(name)), call. = FALSE)
  }
  .Call(cbn_set_isa_c, name)
}

#' @rdname cbn_set_threads
#' @export
cbn_config <- function() .Call(cbn_config_c)
