#' cbn: exact and fast batch normalization on R arrays
#'
#' [layer_batch_normalization()] is keras3's layer over cbn's C++ core; the
#' functional API is [bn_moments()], [bn_normalize()], [bn_train_forward()]
#' and [bn_backward()]; [cbn_set_threads()] and [cbn_config()] control and
#' describe the core. Axes are 1-based as in keras3. R arrays are read in
#' place through their strides and computed on in double precision.
#'
#' @useDynLib cbn, .registration = TRUE
#' @keywords internal
"_PACKAGE"
