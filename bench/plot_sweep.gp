# Figures of the memory and throughput study from the files bench/sweep_data.py writes.
# Run in that directory: gnuplot -e "cfg='...'" plot_sweep.gp   (bench/plot_sweep.sh does it)
#   sweep_memory.png       peak memory per rank vs C, every mode, at the largest P
#   sweep_time.png         forward + backward step time vs C, every mode, at the largest P
#   sweep_memory_vs_P.png  peak memory per rank vs P at the largest C
#   sweep_state.png        memory per rank less parameters and gradients vs C, at the largest P
#                          (what keep and recompute differ in)
load "series.gp"
if (!exists("cfg")) cfg = ""

set terminal pngcairo size 820,560 font "sans,11" linewidth 1.5
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set key inside left top box opaque font ",10" spacing 1.1
set logscale x 2
set logscale y 2
set format y "%g"
set pointsize 1.2

set output "sweep_memory.png"
set title sprintf("Peak memory per rank vs channels, P = %d\n{/*0.8 %s}", Pmax, cfg)
set xlabel "channels C"
set ylabel "peak memory per rank, MiB (Kokkos allocations)"
set xrange [48:1400]
plot for [i=1:|vsC_file|] vsC_file[i] using 1:2 with linespoints \
     lc rgb vsC_colour[i] dt vsC_dash[i] pt (i+3) title vsC_title[i]

set output "sweep_state.png"
set title sprintf("Memory per rank less parameters and gradients vs channels, P = %d\n{/*0.8 %s}", Pmax, cfg)
set ylabel "peak less parameters and gradients, MiB"
set yrange [vsC_state_ymin:*]
plot for [i=1:|vsC_file|] vsC_file[i] using 1:6 with linespoints \
     lc rgb vsC_colour[i] dt vsC_dash[i] pt (i+3) title vsC_title[i]
set yrange [*:*]

set output "sweep_time.png"
set title sprintf("Forward + backward step time vs channels, P = %d\n{/*0.8 %s}", Pmax, cfg)
set ylabel "step time, ms (median of steps, max over ranks)"
plot for [i=1:|vsC_file|] vsC_file[i] using 1:5 with linespoints \
     lc rgb vsC_colour[i] dt vsC_dash[i] pt (i+3) title vsC_title[i]

set output "sweep_memory_vs_P.png"
set title sprintf("Peak memory per rank vs ranks, C = %d\n{/*0.8 %s}", Cmax, cfg)
set xlabel "ranks P"
set ylabel "peak memory per rank, MiB (Kokkos allocations)"
set xrange [0.8:Pmax*1.25]
set xtics 1, 2, Pmax
unset mxtics
set key inside left bottom
set yrange [vsP_ymin:*]
plot for [i=1:|vsP_file|] vsP_file[i] using 1:2 with linespoints \
     lc rgb vsP_colour[i] dt vsP_dash[i] pt (i+3) title vsP_title[i]
