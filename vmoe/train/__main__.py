from vmoe.train.loop import main

main()
